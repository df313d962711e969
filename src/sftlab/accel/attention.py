"""Variable-length ("varlen") attention for padding-free and packed batches on CPU.

The collator's ``mask_mode="flatten"`` puts every example of a batch into one row and passes the example
boundaries as ``cu_seq_lens_q``; transformers forwards them to the attention function. Flash attention uses
them on GPU. With sdpa, transformers instead rebuilds one dense N x N block mask over the whole row and attends
over all of it: work and memory grow with the square of the *batch's* token count. ``varlen_attention_forward``
runs causal attention per example instead (work = sum of squared example lengths, no mask at all), as one
autograd node per layer (``_VarlenAttention``), keeping for backward only what the kernels need at the size it
already has (see the class).

Kernels: sftlab's own (``attention_cpu.c``, built by ``sftlab.accel.native``) where they build, else torch's CPU
flash kernels. On a CPU with AMX under bf16 autocast, forward and backward are bf16 tile products with fp32
accumulation and an fp32 softmax, the arithmetic of torch's bf16 kernels (P and dS rounded to bf16 for their
products), on whole (example, head) items with no per-call overhead: on the benchmark's lengths a layer's
forward + backward took 4.8-6.4 ms against torch's 15-19 ms. Elsewhere (fp32 runs, AVX-512 without AMX) the
native backward is fp32 throughout, 2-3x torch's fp32 backward at 64-450 tokens, and the forward is torch's.

It registers as attention implementation ``"sftlab_varlen"``. Calls without ``cu_seq_lens_q`` (generation with a
KV cache, padded batches) go to transformers' own sdpa function with sdpa's mask, so the model behaves exactly
as with ``attn_implementation="sdpa"`` there.

torch's kernels, where they run, measured on this project's AMX box (torch 2.13, 9 query / 3 key-value heads x
64 dims, one example, ms for fp32 / bf16 kernels): forward 0.2 / 0.1 at 128 tokens, 0.8 / 0.3 at 256, 1.7 / 0.7 at 384,
3.1 / 1.2 at 512, 5.0 / 2.1 at 768; backward 0.7 / 2.2, 2.1 / 2.9, 4.6 / 5.5, 8.4 / 8.0, 14.8 / 11.4. So the
forward runs in the autocast dtype at every length, and the backward of examples shorter than ``FP32_BELOW`` in
fp32 (q, k, v and the output upcast exactly from bf16), longer ones in the autocast dtype. Either way the softmax
is accumulated in fp32 inside the kernels. Without autocast (fp32 or fp64 models) everything runs in the inputs'
dtype.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from sftlab.accel import native

VARLEN_ATTENTION = "sftlab_varlen"
# Where torch's own kernels run (no native kernel built): the length below which their fp32 backward beats the bf16
# one. Measured on a 2-core Intel Xeon (Sapphire Rapids, AMX), torch 2.13, 9 / 3 heads x 64 dims (the docstring's
# table; benchmarks/README.md). Another CPU may cross over elsewhere; the results are the same either way (both
# accumulate the softmax in fp32), only the time differs.
FP32_BELOW = 448
# Examples share one kernel call when at least GROUP_RATIO x the longest of their group, GROUP_MAX at most (_groups).
# Measured on the same Xeon (benchmarks/README.md, "grouped"): 2 threads were 1.1-1.4x one thread on one example of
# SFT length, two examples in one call 0.75x two calls; ratios 0.9 / 0.8 / 0.7 were within noise of each other.
GROUP_RATIO = 0.8
GROUP_MAX = 4
_registered = False


def register_varlen_attention() -> str:
    """Register ``"sftlab_varlen"`` with transformers (idempotent) and return the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
        # Non-varlen calls are plain sdpa, so they get sdpa's mask.
        AttentionMaskInterface.register(VARLEN_ATTENTION, sdpa_mask)
        _registered = True
    return VARLEN_ATTENTION


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: (B, H, N, D) inputs, (B, N, H, D) output, no attention weights."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q covers {sum(lengths)} tokens but the row has {query.shape[2]}")
    device_type = query.device.type
    fast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    if dropout or device_type != "cpu" or query.shape[1] % key.shape[1]:
        return _per_example_sdpa(query, key, value, lengths, fast, dropout, scaling), None
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    # Autocast would recast every input to bf16; the function chooses the dtype per example itself.
    with torch.autocast(device_type, enabled=False):
        return _VarlenAttention.apply(query, key, value, tuple(lengths), fast, float(scale)), None


def _kernel_dtype(n: int, fast: torch.dtype) -> torch.dtype:
    """The backward kernel's dtype: fp32 for short examples when the compute dtype is a 16-bit one."""
    return torch.float32 if n < FP32_BELOW and fast.itemsize < 4 else fast


def _groups(lengths) -> list[list[tuple[int, int]]]:
    """The non-empty examples as ``(start, length)``, longest first, in groups that run as one batched kernel
    call: each example at least ``GROUP_RATIO`` times the group's first (longest), at most ``GROUP_MAX`` of them.

    torch's CPU flash kernels share one call's work among threads by (batch, head) and blocks, and at the lengths
    of SFT examples one example keeps 2 threads only partly busy: measured here (9 query / 3 key-value heads x
    64 dims, fp32 backward), 2 threads were 1.1x one thread at 96 tokens, 1.3x at 192 and 1.4x at 320, while two
    examples in one call took 0.75x the time of two calls. Batching pads the shorter examples to the longest, so
    only examples of similar length are grouped: on the benchmark's 96 examples (12 passes of 8), the backward
    per layer took 156 ms one call per example, 127 ms with a ratio of 0.8 (135 with 0.9 or 0.7)."""
    spans, start = [], 0
    for n in lengths:
        if n:
            spans.append((start, n))
        start += n
    spans.sort(key=lambda span: -span[1])
    groups: list[list[tuple[int, int]]] = []
    for span in spans:
        if groups and len(groups[-1]) < GROUP_MAX and span[1] >= GROUP_RATIO * groups[-1][0][1]:
            groups[-1].append(span)
        else:
            groups.append([span])
    return groups


def _gather(t: torch.Tensor, group: list[tuple[int, int]], n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(len(group), heads, n, D)`` in ``dtype`` from a ``(1, heads, N, D)`` row: the group's examples, each
    zero-padded at its end. Causal attention never lets a real position see a later (padded) one, and the padded
    rows get a zero output gradient, so they add nothing to the real rows' results or gradients."""
    if len(group) == 1:
        start, m = group[0]
        return t[:, :, start : start + m].to(dtype)
    out = t.new_zeros((len(group), t.shape[1], n, t.shape[3]), dtype=dtype)
    for i, (start, m) in enumerate(group):
        out[i, :, :m].copy_(t[0, :, start : start + m])
    return out


class _VarlenAttention(torch.autograd.Function):
    """Causal attention per example of one flattened row, as one autograd node, with torch's CPU flash kernels.

    (1, H, N, D) q / k / v in, (1, N, H, D) out in ``value``'s dtype. What it keeps for backward: q, k and v once,
    at most as wide as the compute dtype (no per-example kernel-dtype copies), the per-example log-sum-exps, and
    the output in ``value``'s dtype, which is the tensor the output projection keeps anyway. sdpa per example
    instead kept a kernel-dtype copy of v and of the output as well (3 KiB per token per layer on SmolLM2-135M,
    fp32 kernel), plus six autograd nodes per example. The kernel's backward gets that output cast back to the
    kernel dtype: in fp32 runs this is the exact output; under bf16 autocast it is the bf16 output, which only
    enters the per-row ``sum(dO * O)``.
    An fp32 backward after a bf16 forward is consistent: both kernels form q k^T from the same bf16 values with
    fp32 accumulation, so the saved log-sum-exp matches the scores the backward recomputes."""

    @staticmethod
    def forward(ctx, query, key, value, lengths, fast, scale):
        n_tok = query.shape[2]
        out = value.new_empty((1, n_tok, query.shape[1], query.shape[3]))
        ctx.in_dtypes = tuple(t.dtype for t in (query, key, value))
        # Under autocast, q and k come from the fp32 rotary embedding; sdpa under autocast would round them to
        # bf16, so they are rounded (once) and kept at that size, and the fp32 kernel upcasts them exactly.
        query, key, value = (t.to(fast) if t.dtype.itemsize > fast.itemsize else t for t in (query, key, value))
        lib = _native_kernels(query, key, value, out, ctx.in_dtypes)
        # The native kernels read one (heads, N) row of log-sum-exps; torch's backward takes each group's own.
        lse_row = query.new_empty((query.shape[1], n_tok), dtype=torch.float32) if lib is not None else None
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int64) if lib is not None else None
        # bf16 compute on a CPU with AMX: the native forward (bf16 tile products, fp32 softmax: torch's bf16
        # kernel's arithmetic, without its per-call overhead and the group padding copies); else torch's kernel.
        native_forward = lib is not None and fast == torch.bfloat16 and native.attention_forward(
            lib, cu, scale, query, key, value, out, lse_row)
        groups, lses = ([] if native_forward else _groups(lengths)), []
        for group in groups:
            n = group[0][1]
            # Forward always in the compute dtype: the bf16 kernel's forward is 2-3x the fp32 one's at every
            # length measured (64-768 tokens); only backward switches kernels by length.
            q, k, v = (_gather(t, group, n, fast) for t in (query, key, value))
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
            for i, (start, m) in enumerate(group):
                out[0, start : start + m].copy_(o[i, :, :m].transpose(0, 1))
                if lse_row is not None:
                    lse_row[:, start : start + m].copy_(lse[i, :, :m])
            if lse_row is None:
                lses.append(lse)
        if lse_row is not None:
            lses = [lse_row]
            ctx.cu = cu
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.groups, ctx.fast, ctx.scale, ctx.native = groups, fast, scale, lib
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *lses = ctx.saved_tensors
        grads = [torch.empty(t.shape, dtype=d, device=t.device) for t, d in zip((query, key, value), ctx.in_dtypes)]
        if ctx.native is not None:
            if grad_out.dtype not in _NATIVE_DTYPES or grad_out.stride(-1) != 1:
                grad_out = grad_out.float().contiguous()
            native.attention_backward(ctx.native, ctx.cu, ctx.scale, query, key, value, out, grad_out, *grads,
                                      lses[0])
            return grads[0], grads[1], grads[2], None, None, None
        for group, lse in zip(ctx.groups, lses):
            n = group[0][1]
            dtype = _kernel_dtype(n, ctx.fast)
            q, k, v, o, g = (_gather(t, group, n, dtype) for t in (query, key, value, out.transpose(1, 2),
                                                                    grad_out.transpose(1, 2)))
            parts = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                g, q, k, v, o, lse, 0.0, True, scale=ctx.scale)
            for full, part in zip(grads, parts):
                for i, (start, m) in enumerate(group):
                    full[0, :, start : start + m].copy_(part[i, :, :m])
        return grads[0], grads[1], grads[2], None, None, None


_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_kernels(query, key, value, out, in_dtypes):
    """sftlab's native attention library (``sftlab.accel.native``) where it applies to these tensors, else None:
    bf16 / fp32 tensors with a contiguous last dimension, gradients wanted in bf16 / fp32, on the CPU."""
    tensors = (query, key, value, out)
    if not all(t.dtype in _NATIVE_DTYPES and t.stride(-1) == 1 and t.device.type == "cpu" for t in tensors):
        return None
    if not all(d in _NATIVE_DTYPES for d in in_dtypes):
        return None
    return native.attention_backward_kernel(query.shape[-1])


def _per_example_sdpa(query, key, value, lengths, fast, dropout, scaling):
    """sdpa per example (dropout, or a device without the CPU kernels above): autograd through sdpa itself."""
    gqa = key.shape[1] != query.shape[1]
    out_dtype = value.dtype
    # split (not slicing in a loop): its backward is one concatenation, where per-example slices would each
    # scatter into a zero-filled gradient of the whole row.
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    outs = []
    with torch.autocast(query.device.type, enabled=False):
        for n, (q, k, v) in zip(lengths, pieces):
            if n == 0:
                continue
            dtype = _kernel_dtype(n, fast)
            o = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=dropout,
                                               scale=scaling, is_causal=True, enable_gqa=gqa)
            outs.append(o.to(out_dtype))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous()
