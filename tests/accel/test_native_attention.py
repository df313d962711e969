"""sftlab's native attention backward (attention_cpu.c via sftlab.accel.native) against causal sdpa per example.

The kernel needs Linux x86-64 with AVX-512 and a C compiler; where both are present it must build and load (the
first test), so a broken build fails here instead of silently falling back to torch's kernels.
"""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

import sftlab.accel.attention as attention
from sftlab.accel import native
from sftlab.accel.attention import varlen_attention_forward

from .test_attention import _cu, _qkv, _reference, _run

CAN_BUILD = native._cpu_has_avx512() and shutil.which("gcc") is not None
needs_native = pytest.mark.skipif(not CAN_BUILD, reason="needs AVX-512 and gcc")


@pytest.fixture
def native_calls(monkeypatch):
    """Counts calls of the native backward, so a test knows which path ran."""
    calls = []
    real = native.attention_backward

    def counting(*args, **kwargs):
        calls.append(args[1].tolist())
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "attention_backward", counting)
    return calls


def _varlen(lengths):
    return lambda q, k, v: varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=_cu(lengths))[0]


@needs_native
@pytest.mark.parametrize("dim", [16, 64, 128])
def test_kernel_builds_and_loads_here(dim):
    assert native.attention_backward_kernel(dim) is not None


@needs_native
@pytest.mark.parametrize("dim,heads,kv_heads", [(16, 4, 2), (64, 9, 3), (128, 4, 4), (32, 6, 1), (80, 4, 2)])
@pytest.mark.parametrize("lengths", [(5, 0, 1, 12, 7), (17, 16, 15, 33, 70, 1), (300, 2)],
                         ids=["short", "block-edges", "long"])
def test_native_backward_matches_each_example_alone_in_fp32(native_calls, dim, heads, kv_heads, lengths):
    """Lengths around the kernel's 16-row blocks and 16-wide vectors, one-token and empty examples, grouped-query
    attention with 1, 2, 3 and 6 query heads per key/value head."""
    q, k, v, grad = _qkv(heads=heads, kv_heads=kv_heads, dim=dim, lengths=lengths)
    got = _run(_varlen(lengths), q, k, v, grad)
    ref = _run(lambda *t: _reference(*t, lengths), q, k, v, grad)
    assert native_calls == [list(_cu(lengths).tolist())]
    for a, b in zip(got, ref):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)


@needs_native
def test_native_backward_under_autocast_writes_each_input_dtype(native_calls):
    """Under bf16 autocast (q, k fp32 from the rotary embedding, v bf16): gradients in each input's dtype, and
    about as close to the fp32 reference on the same bf16 values as torch's own kernels get."""
    lengths = (40, 3, 77, 64)
    q, k, v, grad = _qkv(heads=6, kv_heads=2, dim=64, lengths=lengths)
    q, k = (t.detach().to(torch.bfloat16).float() for t in (q, k))  # what autocast rounds them to anyway
    v16 = v.detach().to(torch.bfloat16)
    ref = _run(lambda *t: _reference(*t, lengths), q, k, v16.float(), grad)

    def under_autocast(*t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _varlen(lengths)(*t)

    got = _run(under_autocast, q, k, v16, grad.to(torch.bfloat16))
    assert len(native_calls) == 1
    assert (got[1].dtype, got[2].dtype, got[3].dtype) == (torch.float32, torch.float32, torch.bfloat16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "_native_kernels", lambda *a: None)
        torch_path = _run(under_autocast, q, k, v16, grad.to(torch.bfloat16))
    assert len(native_calls) == 1
    for g, t, r in zip(got[1:], torch_path[1:], ref[1:]):
        # With AMX the backward's P and dS are rounded to bf16 for their products (as torch's bf16 kernel does);
        # torch's default path here is its fp32 backward. Either way the bf16 inputs and output dominate.
        err, torch_err = (g.float() - r).abs().max(), (t.float() - r).abs().max()
        assert err <= 1.25 * torch_err + 1e-3 * r.abs().max(), (err, torch_err)


@needs_native
def test_native_backward_is_the_same_bits_with_one_thread_or_two():
    """Work is shared among threads by (example, head), and dK / dV are summed over query heads in a fixed order:
    the thread count and timing cannot change a bit."""
    lengths = (90, 31, 64, 200)
    q, k, v, grad = _qkv(heads=9, kv_heads=3, dim=64, lengths=lengths)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _run(_varlen(lengths), q, k, v, grad)
        torch.set_num_threads(2)
        two = _run(_varlen(lengths), q, k, v, grad)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@needs_native
def test_native_backward_keeps_one_row_of_log_sum_exps():
    """What autograd holds after a bf16-autocast forward on the native path: q, k, v and the output once in bf16
    and one (heads x tokens) fp32 row of log-sum-exps."""
    lengths = (12, 0, 11, 3, 10, 12)
    q, k, v, _ = _qkv(dim=16, lengths=lengths)
    v = v.detach().to(torch.bfloat16).requires_grad_()
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _varlen(lengths)(q, k, v)
    n, dim = sum(lengths), q.shape[-1]
    assert sum(kept.values()) == (2 * q.shape[1] + 2 * k.shape[1]) * n * dim * 2 + q.shape[1] * n * 4


def test_without_a_compiler_training_falls_back_to_torch_kernels(monkeypatch, tmp_path, caplog):
    """No compiler (or no AVX-512): a warning, torch's kernels, the same results."""
    monkeypatch.setenv("CC", "no-such-compiler-sftlab")
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_libs", {})
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(native, "_cpu_has_avx512", lambda: True)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert native.attention_backward_kernel(16) is None
    assert "no C compiler" in caplog.text
    lengths = (9, 4, 20)
    q, k, v, grad = _qkv(dim=16, lengths=lengths)
    got = _run(_varlen(lengths), q, k, v, grad)
    ref = _run(lambda *t: _reference(*t, lengths), q, k, v, grad)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_native_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("SFTLAB_NATIVE", "0")
    monkeypatch.setattr(native, "_libs", {})
    assert native.attention_backward_kernel(64) is None


@needs_native
def test_the_built_library_is_cached_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("SFTLAB_CACHE", str(tmp_path))
    first = native._build("attention_cpu.c", ("HEAD_DIM=16",))
    assert first.parent == tmp_path / "native" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert native._build("attention_cpu.c", ("HEAD_DIM=16",)) == first and first.stat().st_mtime_ns == stamp
    assert list(first.parent.iterdir()) == [first]  # no temporary file left behind


def _has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


needs_amx = pytest.mark.skipif(not (CAN_BUILD and _has_amx()), reason="needs AMX-BF16 and gcc")


@needs_amx
@pytest.mark.parametrize("dim,heads,kv_heads", [(64, 9, 3), (128, 4, 2), (32, 2, 2)])
@pytest.mark.parametrize("lengths", [(1, 15, 16, 17, 31, 32, 33), (100, 0, 300)], ids=["tile-edges", "long"])
def test_bf16_tile_kernels_are_as_close_as_torchs_bf16_attention(monkeypatch, dim, heads, kv_heads, lengths):
    """Under bf16 autocast on a CPU with AMX, the forward runs as bf16 tile products (torch's bf16 kernel's
    arithmetic) and the backward's q k^T and dO v^T likewise (exact: their inputs are bf16). Outputs and gradients
    are as close to the fp32 computation on the same bf16 inputs as torch's own kernels get."""
    forward_ran = []
    real_forward = native.attention_forward
    monkeypatch.setattr(native, "attention_forward", lambda *a: forward_ran.append(real_forward(*a)) or
                        forward_ran[-1])
    q, k, v, grad = _qkv(heads=heads, kv_heads=kv_heads, dim=dim, lengths=lengths)
    q, k, v, grad = (t.detach().to(torch.bfloat16) for t in (q, k, v, grad))
    ref = _run(lambda *t: _reference(*t, lengths), q.float(), k.float(), v.float(), grad.float())

    def under_autocast(*t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _varlen(lengths)(*t)

    ours = _run(under_autocast, q, k, v, grad)
    assert forward_ran == [True]
    monkeypatch.setattr(attention, "_native_kernels", lambda *a: None)
    theirs = _run(under_autocast, q, k, v, grad)
    for o, t, r in zip(ours, theirs, ref):
        assert o.dtype == torch.bfloat16
        err, torch_err = (o.float() - r).abs().max(), (t.float() - r).abs().max()
        assert err <= 1.25 * torch_err + 1e-3 * r.abs().max(), (float(err), float(torch_err))


@needs_amx
def test_bf16_tile_kernels_give_the_same_bits_with_one_thread_or_two():
    lengths = (90, 31, 64, 200)
    q, k, v, grad = (t.detach().to(torch.bfloat16) for t in _qkv(heads=9, kv_heads=3, dim=64, lengths=lengths))

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _run(_varlen(lengths), q, k, v, grad)

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
