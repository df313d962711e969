"""sftlab's native gated-MLP kernel (swiglu_cpu.c via sftlab.accel.native) against the formula.

It computes silu(gate) * up and both gradients in fp32 and rounds once to the tensors' dtype; torch's bf16 ops
round silu(gate) first. So in fp32 it matches the fp64 formula to fp32 rounding, and in bf16 it is within one
rounding of the exact value and never further from it than torch's ops.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sftlab.accel.swiglu as S
from sftlab.accel import native
from sftlab.accel.swiglu import swiglu, use_fused_swiglu

from .test_native_attention import needs_native

pytestmark = needs_native


def _exact(gate, up, grad):
    g, u = (t.detach().double().requires_grad_() for t in (gate, up))
    out = F.silu(g) * u
    out.backward(grad.double())
    return out.detach(), g.grad, u.grad


def _ours(gate, up, grad):
    g, u = (t.detach().clone().requires_grad_() for t in (gate, up))
    out = swiglu(g, u)
    out.backward(grad)
    return out.detach(), g.grad, u.grad


def _inputs(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(n, generator=g) * 4).to(dtype)  # well into both tails of the sigmoid
    gate[:4] = torch.tensor([0.0, -90.0, 90.0, -1e-3])
    return gate, torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)


def test_kernel_builds_and_loads_here():
    assert native.elementwise_kernels() is not None


@pytest.mark.parametrize("n", [5, 16, 2048 + 33, 3 * 4096])  # vector tails, block tails
def test_native_swiglu_matches_the_formula_in_fp32(monkeypatch, n):
    calls = []
    real = native.swiglu_backward
    monkeypatch.setattr(native, "swiglu_backward", lambda *a: calls.append(1) or real(*a))
    gate, up, grad = _inputs(n, torch.float32)
    for got, ref in zip(_ours(gate, up, grad), _exact(gate, up, grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=1e-6)
    assert calls == [1]


def test_native_swiglu_in_bf16_is_within_one_rounding_and_no_worse_than_torch(monkeypatch):
    gate, up, grad = _inputs(3 * 4096 + 7, torch.bfloat16)
    ours = _ours(gate, up, grad)
    exact = _exact(gate, up, grad)
    monkeypatch.setattr(S, "_native", lambda g, u: None)
    theirs = _ours(gate, up, grad)
    for o, t, e in zip(ours, theirs, exact):
        assert o.dtype == torch.bfloat16
        err = (o.double() - e).abs()
        # one bf16 rounding of the exact value: half an ulp, plus the fp32 arithmetic's ~1e-6 relative
        ulp = torch.finfo(torch.bfloat16).eps * e.abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
        assert bool((err <= 0.5 * ulp * (1 + 1e-4) + 1e-6 * e.abs() + 1e-30).all())
        assert err.max() <= (t.double() - e).abs().max()


def test_fused_mlp_with_native_kernel_matches_the_module_in_fp32():
    from tests.accel.test_linear import _batch, _fuse, _loss_and_grads, _lora_model

    results = []
    for fuse_mlp in (False, True):
        model = _lora_model(bias=False)
        _fuse(model)
        if fuse_mlp:
            assert use_fused_swiglu(model) == 2
        results.append(_loss_and_grads(model, _batch(), False))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    for name in grads_a:
        # fp32 rounding differences (sigmoid through exp, one rounding less) carried through the layers
        err = (grads_a[name] - grads_b[name]).abs().max() / grads_a[name].abs().max()
        assert err < 2e-5, (name, float(err))


def test_portable_bf16_rounding_gives_the_same_bits_as_the_cpu_instruction():
    """CPUs without AVX512-BF16 round fp32 -> bf16 in integer arithmetic: the same bits as the instruction for
    normal numbers, infinities and NaN (tested here by building that path on purpose)."""
    lib, portable = native.elementwise_kernels(), native.elementwise_kernels(("SFTLAB_PORTABLE_BF16",))
    assert portable is not None and portable is not lib
    gate, up, grad = _inputs(4096 + 5, torch.bfloat16)
    gate[5], up[6], grad[7] = float("nan"), float("inf"), 3.0e38
    for fn in (lambda l: native.swiglu_forward(l, gate, up),
               lambda l: native.swiglu_backward(l, gate, up, grad, True, True)):
        a, b = fn(lib), fn(portable)
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            assert torch.equal(x.view(torch.int16), y.view(torch.int16))
