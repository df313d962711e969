"""sftlab.accel.rotary against transformers' apply_rotary_pos_emb."""

from __future__ import annotations

import pytest
import torch

from sftlab.accel.rotary import _fused, rotate, use_fused_rotary
from tests.helpers import tiny_llama_config


def _original():
    import transformers.models.llama.modeling_llama as llama

    fn = llama.apply_rotary_pos_emb
    return getattr(fn, "_sftlab_original", fn)


def _case(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 6, 8, generator=g).to(dtype)
    k = torch.randn(2, 2, 6, 8, generator=g).to(dtype)
    ang = torch.rand(2, 6, 4, generator=g) * 7
    emb = torch.cat([ang, ang], dim=-1)
    return q, k, emb.cos(), emb.sin()


def test_rotate_against_the_formula_in_fp64():
    q, _, cos, sin = _case(torch.float64)
    q.requires_grad_()
    cos, sin = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    assert torch.autograd.gradcheck(lambda x: rotate(x, cos, sin), (q,))
    rot = torch.cat([-q[..., 4:], q[..., :4]], dim=-1)
    torch.testing.assert_close(rotate(q, cos, sin), q * cos + rot * sin)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_apply_matches_transformers(dtype):
    """Same outputs (fp32, as transformers' promotion gives for bf16 q and fp32 cos) and the same gradients; for
    bf16 inputs the fused backward rounds the gradient once where transformers rounds each term, so bf16 gradients
    agree to bf16 precision."""
    original = _original()
    fused = _fused(original)
    results = []
    for fn in (original, fused):
        q, k, cos, sin = _case(dtype)
        q.requires_grad_()
        k.requires_grad_()
        qe, ke = fn(q, k, cos, sin)
        gq, gk = torch.ones_like(qe).cumsum(-1), torch.ones_like(ke).cumsum(-2)
        torch.autograd.backward([qe, ke], [gq, gk])
        results.append((qe.detach(), ke.detach(), q.grad, k.grad))
    for got, ref in zip(results[1], results[0]):
        assert got.dtype == ref.dtype
        tol = 1e-6 if (dtype == torch.float32 or got.dtype == torch.float32) else 8e-3
        torch.testing.assert_close(got, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_other_layouts_take_the_original():
    original = _original()
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    fused = _fused(spy)
    q, k, cos, sin = _case(torch.float32)
    fused(q, k, cos, sin)
    assert not calls
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # (B, N, H, D) with unsqueeze_dim=2
    out = fused(qt, kt, cos, sin, unsqueeze_dim=2)
    assert calls and torch.equal(out[0], original(qt, kt, cos, sin, unsqueeze_dim=2)[0])
    fused(q, k, cos.double(), sin.double())
    assert len(calls) == 2


def test_use_fused_rotary_swaps_the_module_function_once():
    import transformers.models.llama.modeling_llama as llama
    from transformers import LlamaForCausalLM

    before = llama.apply_rotary_pos_emb
    try:
        model = LlamaForCausalLM(tiny_llama_config(40))
        first = use_fused_rotary(model)
        if hasattr(before, "_sftlab_original"):  # an earlier test's training run already swapped it
            assert first == []
        else:
            assert first == [llama.__name__]
        assert hasattr(llama.apply_rotary_pos_emb, "_sftlab_original")
        assert use_fused_rotary(model) == []
    finally:
        llama.apply_rotary_pos_emb = before
