"""sftlab.accel.attention's one-node varlen function against causal sdpa run on each example alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sftlab.accel.attention as attention
from sftlab.accel.attention import varlen_attention_forward

LENGTHS = (5, 0, 1, 12, 7)  # an empty example and a one-token one included
# Examples of similar lengths run as one batched kernel call, the shorter ones zero-padded: [12, 12, 11, 10], [3]
GROUPED = (12, 0, 11, 3, 10, 12)
BOTH = pytest.mark.parametrize("lengths", [LENGTHS, GROUPED], ids=["alone", "grouped"])


def _qkv(dtype=torch.float32, heads=4, kv_heads=2, dim=8, seed=0, lengths=LENGTHS):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(1, heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(1, kv_heads, n, dim, generator=g, dtype=dtype, requires_grad=True)
    grad = torch.randn(1, n, heads, dim, generator=g, dtype=dtype)
    return q, k, v, grad


def _cu(lengths=LENGTHS):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])


def _reference(q, k, v, lengths=LENGTHS):
    """Each example through causal sdpa on its own (math on repeated key/value heads), outputs side by side."""
    rep = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in lengths:
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


@BOTH
def test_varlen_function_matches_each_example_alone_in_fp32(lengths):
    q, k, v, grad = _qkv(lengths=lengths)
    got = _run(lambda *t: varlen_attention_forward(None, *t, None, cu_seq_lens_q=_cu(lengths))[0], q, k, v, grad)
    ref = _run(lambda *t: _reference(*t, lengths), q, k, v, grad)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@BOTH
def test_varlen_gradcheck_in_fp64(lengths):
    q, k, v, _ = _qkv(torch.float64, heads=2, kv_heads=1, dim=4, lengths=lengths)

    def fn(q, k, v):
        return varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=_cu(lengths))[0]

    assert torch.autograd.gradcheck(fn, (q, k, v))


@BOTH
@pytest.mark.parametrize("fp32_below", [0, 8, 10_000])  # all bf16 kernels, mixed, all fp32 kernels
def test_varlen_under_autocast_is_as_close_as_autocast_sdpa(monkeypatch, fp32_below, lengths):
    """Under bf16 autocast (q and k in fp32 as the rotary embedding gives them, v in bf16 as the projection
    gives it), outputs and gradients are at least as close to the fp32 reference as plain sdpa under autocast,
    whatever the per-example kernel dtype; gradients come back in each input's dtype."""
    monkeypatch.setattr(attention, "FP32_BELOW", fp32_below)
    q, k, v, grad = _qkv(lengths=lengths)
    v16 = v.detach().to(torch.bfloat16)
    ref = _run(lambda *t: _reference(*t, lengths), q, k, v16.float(), grad)

    def under_autocast(fn):
        def run(q, k, v):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(q, k, v)
        return run

    got = _run(under_autocast(lambda *t: varlen_attention_forward(None, *t, None, cu_seq_lens_q=_cu(lengths))[0]),
               q, k, v16, grad.to(torch.bfloat16))
    base = _run(under_autocast(lambda *t: _reference(*t, lengths)), q, k, v16, grad.to(torch.bfloat16))
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == got[2].dtype == torch.float32
    assert got[3].dtype == torch.bfloat16
    for g, b, r in zip(got, base, ref):
        err, base_err = (g.float() - r).abs().max(), (b.float() - r).abs().max()
        assert err <= 1.5 * base_err + 1e-3, (err, base_err)


@BOTH
def test_varlen_keeps_inputs_once_and_no_kernel_copies(lengths):
    """What autograd holds after a bf16-autocast forward: q and k once in bf16, v, the output (in v's dtype) and
    the small log-sum-exps (one per example, or per group padded to its longest); no fp32 copies of v or of the
    output."""
    q, k, v, _ = _qkv(lengths=lengths)
    v = v.detach().to(torch.bfloat16).requires_grad_()
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=_cu(lengths))
    n, dim = sum(lengths), q.shape[-1]
    big = (q.shape[1] + 2 * k.shape[1] + q.shape[1]) * n * dim * 2  # q, k, v, out in bf16
    padded = [12, 3] if lengths == GROUPED else [m for m in lengths if m]
    sizes = [4, 1] if lengths == GROUPED else [1] * len(padded)
    lse = sum(q.shape[1] * m * b * 4 for m, b in zip(padded, sizes))
    assert sum(kept.values()) == big + lse


def test_examples_of_similar_length_share_a_kernel_call():
    """(start, length), longest first; a group takes examples of at least 0.8x its longest, at most 4."""
    assert attention._groups(GROUPED) == [[(0, 12), (36, 12), (12, 11), (26, 10)], [(23, 3)]]
    assert attention._groups(LENGTHS) == [[(6, 12)], [(18, 7)], [(0, 5)], [(5, 1)]]
    assert attention._groups((10,) * 6) == [[(0, 10), (10, 10), (20, 10), (30, 10)], [(40, 10), (50, 10)]]


def test_varlen_rejects_boundaries_that_do_not_cover_the_row():
    q, k, v, _ = _qkv()
    with pytest.raises(ValueError, match="covers 20 tokens but the row has 25"):
        varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=torch.tensor([0, 20]))
