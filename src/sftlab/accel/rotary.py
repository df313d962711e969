"""Rotary position embedding as one autograd function, for CPU training.

transformers applies RoPE as ``q * cos + rotate_half(q) * sin`` with ``rotate_half`` a negation and a
concatenation: under bf16 autocast q and k arrive in bf16, cos/sin in fp32, and each of those ops is a full pass
that promotes to fp32, with as many again in backward. Measured by leaving RoPE out of a SmolLM2-135M LoRA step
(1185 tokens, 2 threads): 0.14 s of 1.8 s. Written per half of the head dimension,
``out1 = x1 c1 - x2 s1`` and ``out2 = x2 c2 + x1 s2`` are two passes each, straight into one fp32 output (the dtype
transformers' promotion gives), and backward is the transposed rotation, ``dx1 = g1 c1 + g2 s2``,
``dx2 = g2 c2 - g1 s1``. Where sftlab's native kernel builds (``elementwise_cpu.c``, head dim a multiple of 32),
each direction is one pass with the output in x's memory layout (token-major, as the projection gave it), so the
projection's backward reads the gradient without a copy.

``use_fused_rotary`` replaces ``apply_rotary_pos_emb`` in the transformers modules of the attention classes
listed below, which all call it by that name and share this formula. The replacement calls the original for
anything else (other shapes or dtypes, cos/sin that need gradients).
"""

from __future__ import annotations

import sys

import torch

from sftlab.accel import native

# Attention classes whose module-level apply_rotary_pos_emb is the rotate_half formula above (unsqueeze_dim=1).
ROTARY_ATTENTION_CLASSES = {"LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention"}


def _native(x, cos, sin):
    """sftlab's native kernel (``elementwise_cpu.c``) where it applies: CPU, x bf16 or fp32 as (1, heads, N, D)
    with D a multiple of 32, cos / sin fp32 (1, 1, N, D), every last dimension contiguous. Else None."""
    if (x.device.type != "cpu" or x.dim() != 4 or x.shape[0] != 1 or x.shape[-1] % 32
            or x.dtype not in (torch.bfloat16, torch.float32) or x.stride(-1) != 1
            or cos.shape != (1, 1, x.shape[2], x.shape[3]) or sin.shape != cos.shape
            or cos.stride() != sin.stride() or cos.stride(-1) != 1):
        return None
    return native.elementwise_kernels()


class _Rotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        ctx.native = lib = _native(x, cos, sin)
        out_dtype = torch.promote_types(x.dtype, cos.dtype)
        if lib is not None:
            # In x's memory layout (token-major from the projection), which the backward's gradient then keeps:
            # the projection's backward reads it without a copy.
            out = torch.empty_like(x, dtype=out_dtype)
            native.rotary(lib, x, cos, sin, out, transpose=False)
            return out
        h = x.shape[-1] // 2
        out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
        x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
        torch.mul(x1, cos[..., :h], out=o1)
        o1.addcmul_(x2, sin[..., :h], value=-1)
        torch.mul(x2, cos[..., h:], out=o2)
        o2.addcmul_(x1, sin[..., h:])
        return out

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        if ctx.native is not None and grad.dtype in (torch.bfloat16, torch.float32) and grad.stride(-1) == 1:
            dx = torch.empty(grad.shape[0], grad.shape[2], grad.shape[1], grad.shape[3], dtype=ctx.x_dtype,
                             device=grad.device).transpose(1, 2)  # token-major, as the projection gave x
            native.rotary(ctx.native, grad, cos, sin, dx, transpose=True)
            return dx, None, None
        h = grad.shape[-1] // 2
        dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        g1, g2, d1, d2 = grad[..., :h], grad[..., h:], dx[..., :h], dx[..., h:]
        torch.mul(g1, cos[..., :h], out=d1)
        d1.addcmul_(g2, sin[..., h:])
        torch.mul(g2, cos[..., h:], out=d2)
        d2.addcmul_(g1, sin[..., :h], value=-1)
        return dx.to(ctx.x_dtype), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (cos/sin broadcast against x; fp32 result for bf16 x and fp32 cos)."""
    with torch.autocast(x.device.type, enabled=False):
        return _Rotary.apply(x, cos, sin)


def _fused(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **kwargs):
        if (kwargs or unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3
                or cos.dtype != torch.float32 or sin.dtype != torch.float32
                or cos.requires_grad or sin.requires_grad or q.shape[-1] % 2 or cos.shape[-1] != q.shape[-1]):
            return original(q, k, cos, sin, unsqueeze_dim, **kwargs)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return rotate(q, cos, sin), rotate(k, cos, sin)

    apply_rotary_pos_emb._sftlab_original = original
    return apply_rotary_pos_emb


def use_fused_rotary(model: torch.nn.Module) -> list[str]:
    """Swap ``apply_rotary_pos_emb`` in the modules of the model's known attention classes; returns their names.
    Process-wide for those modules (it is a module function), and numerically the same as the original."""
    names = sorted({type(m).__module__ for m in model.modules() if type(m).__name__ in ROTARY_ATTENTION_CLASSES})
    done = []
    for name in names:
        module = sys.modules.get(name)
        fn = getattr(module, "apply_rotary_pos_emb", None)
        if fn is None or hasattr(fn, "_sftlab_original"):
            continue
        module.apply_rotary_pos_emb = _fused(fn)
        done.append(name)
    return done
