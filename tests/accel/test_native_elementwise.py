"""sftlab's native RMSNorm and rotary kernels (elementwise_cpu.c via sftlab.accel.native) against the formulas."""

from __future__ import annotations

import pytest
import torch

import sftlab.accel.norm as norm
import sftlab.accel.rotary as rotary
from sftlab.accel import native

from .test_native_attention import needs_native

pytestmark = needs_native


@pytest.fixture
def native_calls(monkeypatch):
    calls = []
    for name in ("rotary", "rms_norm_forward", "rms_norm_backward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("hidden", [16, 50, 576])  # one vector, a masked tail, SmolLM2's width
@pytest.mark.parametrize("trained_weight", [False, True])
def test_native_rms_norm_matches_the_formula(native_calls, hidden, trained_weight):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 37, hidden, generator=g) * 3
    w = torch.rand(hidden, generator=g) + 0.5
    grad = torch.randn(3, 37, hidden, generator=g)
    xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_(trained_weight)
    y = norm.rms_norm(xi, wi, 1e-5)
    y.backward(grad)
    assert native_calls == ["rms_norm_forward", "rms_norm_backward"]
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_(trained_weight)
    ref = wd * xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-5)
    ref.backward(grad.double())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref.detach(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(xi.grad.double(), xd.grad, rtol=1e-5, atol=1e-6)
    if trained_weight:
        torch.testing.assert_close(wi.grad.double(), wd.grad, rtol=1e-5, atol=1e-5)
    else:
        assert wi.grad is None


def _rope_case(dtype, heads=9, n=70, dim=64, seed=0):
    """q as the projection gives it: (1, N, heads, D) memory viewed as (1, heads, N, D)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, n, heads, dim, generator=g).to(dtype).transpose(1, 2)
    ang = torch.rand(1, n, dim // 2, generator=g) * 7
    emb = torch.cat([ang, ang], dim=-1)
    return q, emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_native_rotary_matches_the_formula(native_calls, dtype, dim):
    """Forward in fp32 (the promoted dtype), backward in x's dtype and layout, against the rotate_half formula in
    fp64: one fp32 rounding forward; backward within one rounding to x's dtype."""
    q, cos, sin = _rope_case(dtype, dim=dim)
    grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))
    qi = q.detach().clone().requires_grad_()
    out = rotary.rotate(qi, cos, sin)
    out.backward(grad)
    assert native_calls == ["rotary", "rotary"]
    qd = q.detach().double().requires_grad_()
    h = dim // 2
    ref = qd * cos.double() + torch.cat([-qd[..., h:], qd[..., :h]], dim=-1) * sin.double()
    ref.backward(grad.double())
    assert out.dtype == torch.float32 and qi.grad.dtype == dtype
    assert qi.grad.stride() == q.stride()  # the projection's token-major layout, so its backward needs no copy
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -8
    torch.testing.assert_close(qi.grad.double(), qd.grad, rtol=tol, atol=tol)


def test_head_dims_the_rotary_kernel_does_not_cover_take_torchs_ops(native_calls):
    q, cos, sin = _rope_case(torch.float32, dim=48)
    rotary.rotate(q, cos, sin)
    assert native_calls == []
