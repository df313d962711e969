"""sftlab.train.attention's one-node varlen function against causal sdpa run on each example alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sftlab.train.attention as attention
from sftlab.train.attention import varlen_attention_forward

LENGTHS = (5, 0, 1, 12, 7)  # an empty example and a one-token one included


def _qkv(dtype=torch.float32, heads=4, kv_heads=2, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    q = torch.randn(1, heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, n, heads, dim, generator=g, dtype=dtype)
    return q, k, v, grad


def _cu():
    return torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()])


def _reference(q, k, v):
    """Each example through causal sdpa on its own (math on repeated key/value heads), outputs side by side."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in LENGTHS:
        sl = slice(start, start + n)
        if n:
            o = F.scaled_dot_product_attention(q[:, :, sl], k[:, :, sl].repeat_interleave(rep, 1),
                                               v[:, :, sl].repeat_interleave(rep, 1), is_causal=True)
            outs.append(o.transpose(1, 2))
        start += n
    return torch.cat(outs, dim=1)


def _run(fn, q, k, v, grad):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def test_varlen_function_matches_each_example_alone_in_fp32():
    q, k, v, grad = _qkv()
    got = _run(lambda *t: varlen_attention_forward(None, *t, None, cu_seq_lens_q=_cu())[0], q, k, v, grad)
    ref = _run(_reference, q, k, v, grad)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_varlen_gradcheck_in_fp64():
    q, k, v, _ = _qkv(torch.float64, heads=2, kv_heads=1, dim=4)

    def fn(q, k, v):
        return varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=_cu())[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("fp32_below", [0, 8, 10_000])  # all bf16 kernels, mixed, all fp32 kernels
def test_varlen_under_autocast_is_as_close_as_autocast_sdpa(monkeypatch, fp32_below):
    """Under bf16 autocast (q and k in fp32 as the rotary embedding gives them, v in bf16 as the projection
    gives it), outputs and gradients are at least as close to the fp32 reference as plain sdpa under autocast,
    whatever the per-example kernel dtype; gradients come back in each input's dtype."""
    monkeypatch.setattr(attention, "FP32_BELOW", fp32_below)
    q, k, v, grad = _qkv()
    v16 = v.detach().to(torch.bfloat16)
    ref = _run(_reference, q, k, v16.float(), grad)

    def under_autocast(fn):
        def run(q, k, v):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(q, k, v)
        return run

    got = _run(under_autocast(lambda *t: varlen_attention_forward(None, *t, None, cu_seq_lens_q=_cu())[0]),
               q, k, v16, grad.to(torch.bfloat16))
    base = _run(under_autocast(_reference), q, k, v16, grad.to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    assert got[3].dtype == torch.bfloat16
    for g, b, r in zip(got, base, ref):
        err, base_err = (g.float() - r).abs().max(), (b.float() - r).abs().max()
        assert err <= 1.5 * base_err + 1e-3, (err, base_err)


def test_varlen_keeps_inputs_once_and_no_kernel_copies():
    """What autograd holds after a bf16-autocast forward: q and k once in bf16, v, the output (in v's dtype) and
    the small log-sum-exps; no fp32 copies of v or of the output."""
    q, k, v, _ = _qkv()
    v = v.detach().to(torch.bfloat16).requires_grad_()
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=_cu())
    n, dim = sum(LENGTHS), q.shape[-1]
    big = (q.shape[1] + 2 * k.shape[1] + q.shape[1]) * n * dim * 2  # q, k, v, out in bf16
    lse = sum(q.shape[1] * m * 4 for m in LENGTHS if m)
    assert sum(kept.values()) == big + lse


def test_varlen_rejects_boundaries_that_do_not_cover_the_row():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="covers 20 tokens but the row has 25"):
        varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 20]))
