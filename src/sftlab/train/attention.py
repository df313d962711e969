"""Variable-length ("varlen") attention for padding-free and packed batches on CPU.

The collator's ``mask_mode="flatten"`` puts every example of a batch into one row and passes the example
boundaries as ``cu_seq_lens_q``; transformers forwards them to the attention function. Flash attention uses
them on GPU. With sdpa, transformers instead rebuilds one dense N x N block mask over the whole row and attends
over all of it: work and memory grow with the square of the *batch's* token count. ``varlen_attention_forward``
runs causal attention per example instead (work = sum of squared example lengths, no mask at all).

It registers as attention implementation ``"sftlab_varlen"``. Calls without ``cu_seq_lens_q`` (generation with a
KV cache, padded batches) go to transformers' own sdpa function with sdpa's mask, so the model behaves exactly
as with ``attn_implementation="sdpa"`` there.

CPU kernel choice, measured on this project's AMX box (torch 2.13, 9 query / 3 key-value heads x 64 dims,
forward + backward, one example): fp32 / bf16 flash kernel 1.2 / 3.1 ms at 128 tokens, 4.1 / 5.2 at 256,
8.3 / 6.0 at 384, 11.8 / 9.6 at 512, 39 / 23 at 1024. Examples shorter than ``FP32_BELOW`` run in fp32, longer
ones in the autocast dtype; the threshold sits above the kernels' own crossover (~320) because the bf16 path also
casts q, k and v: in a real 8-example LoRA step with examples of 281 and 336 tokens, fp32 for both was 4% faster
than bf16. Either way the softmax is accumulated in fp32 inside the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VARLEN_ATTENTION = "sftlab_varlen"
FP32_BELOW = 384
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
    # Grouped-query attention: sdpa maps query heads to shared key/value heads itself (no expanded copies).
    gqa = key.shape[1] != query.shape[1]
    out_dtype = value.dtype
    device_type = query.device.type
    fast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else query.dtype
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if sum(lengths) != query.shape[2]:
        raise ValueError(f"cu_seq_lens_q covers {sum(lengths)} tokens but the row has {query.shape[2]}")
    # split (not slicing in a loop): its backward is one concatenation, where per-example slices would each
    # scatter into a zero-filled gradient of the whole row.
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    outs = []
    # Autocast would recast every input to bf16; the dtype is chosen per example below instead.
    with torch.autocast(device_type, enabled=False):
        for n, (q, k, v) in zip(lengths, pieces):
            if n == 0:
                continue
            dtype = torch.float32 if n < FP32_BELOW else fast
            o = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype), dropout_p=dropout,
                                               scale=scaling, is_causal=True, enable_gqa=gqa)
            outs.append(o.to(out_dtype))
    out = torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
    return out.transpose(1, 2).contiguous(), None
