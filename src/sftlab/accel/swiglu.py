"""The gated MLP's ``silu(gate) * up`` as one autograd function that keeps less for backward.

Autograd keeps three (tokens x intermediate) tensors per layer for ``act_fn(gate) * up``: ``gate`` for the SiLU's
backward, and ``silu(gate)`` and ``up`` for the product's. ``silu(gate)`` is one cheap elementwise op away from
``gate``, so this function keeps only ``gate`` and ``up`` and recomputes it in backward: on SmolLM2-135M (1536
intermediate, bf16) that is 3 KiB less per token per layer, ~90 MiB for a 1024-token forward pass. With torch's
ops the forward and both gradients are the same ops in the same dtype as autograd's (``silu``, ``mul``;
``silu_backward``), so the numbers are bit for bit those of the module it replaces (test). Where sftlab's native
kernel builds (``elementwise_cpu.c``), each direction is one pass in fp32 arithmetic rounded once to the tensors'
dtype (torch's bf16 ops round ``silu(gate)`` before the product): within one rounding of the exact value, never
further from it than torch's ops (test), 7 passes over the activations per layer and step down to 3.

When the down projection is on sftlab's fused linear path (``sftlab.accel.linear``, LoRA or not), the product
``silu(gate) * up`` is that projection's input, which it would keep as well; ``_SwiGLUDown`` runs both as one
function and recomputes the product in backward too: 6 KiB less per token per layer in all, the same ops and
dtypes, so again bit-identical with torch's ops (test).

``use_fused_swiglu`` swaps the forward of the known Llama-style MLP classes whose activation is SiLU; any other
MLP, and any call with hooks on its projections' modules, keeps its own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sftlab.accel import native
from sftlab.accel.linear import cast_params, fused_parts, project, project_backward, swap_forward

# Classes whose forward is exactly: down_proj(act_fn(gate_proj(x)) * up_proj(x)).
MLP_CLASSES = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
_SILU_CLASSES = {"SiLUActivation", "SiLU"}


def _native(gate: torch.Tensor, up: torch.Tensor):
    """sftlab's native elementwise kernels (``swiglu_cpu.c``) where they apply: CPU tensors of one shape and one
    dtype (bf16 or fp32), contiguous. Else None, and torch's ops run."""
    if (gate.device.type != "cpu" or gate.dtype not in (torch.bfloat16, torch.float32) or up.dtype != gate.dtype
            or up.shape != gate.shape or not gate.is_contiguous() or not up.is_contiguous()):
        return None
    return native.elementwise_kernels()


def _product(lib, gate, up):
    return native.swiglu_forward(lib, gate, up) if lib is not None else F.silu(gate) * up


def _input_grads(lib, gate, up, grad, need_gate, need_up, silu=None):
    """Gradients of ``silu(gate) * up`` for the incoming ``grad``: natively in one pass, or torch's ops."""
    if lib is not None:
        return native.swiglu_backward(lib, gate, up, grad.contiguous(), need_gate, need_up)
    silu = F.silu(gate) if silu is None else silu
    grad_up = grad * silu if need_up else None
    grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if need_gate else None
    return grad_gate, grad_up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        ctx.native = _native(gate, up)
        return _product(ctx.native, gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        return _input_grads(ctx.native, gate, up, grad, *ctx.needs_input_grad[:2])


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for backward."""
    if gate.dtype != up.dtype or gate.shape != up.shape:
        return F.silu(gate) * up  # type promotion or broadcasting: leave it to autograd
    # Like the ops it replaces, it runs in its inputs' dtype (silu and mul are not autocast ops).
    with torch.autocast(gate.device.type, enabled=False):
        return _SwiGLU.apply(gate, up)


class _SwiGLUDown(torch.autograd.Function):
    """``down(silu(gate) * up)`` for a down projection on sftlab's fused linear path (LoRA or not): the product
    is the projection's input, so it is recomputed in backward as well instead of being kept."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias, lora_a, lora_b, scaling, dtype):
        ctx.native = _native(gate, up)
        h = _product(ctx.native, gate, up).reshape(-1, gate.shape[-1]).to(dtype)
        (w, b0, a, b), ctx.param_dtypes = cast_params(weight, bias, lora_a, lora_b, dtype)
        y, t = project(h, w, b0, a, b, scaling)
        ctx.save_for_backward(gate, up, w, t, a, b)
        ctx.scaling = scaling
        return y.view(*gate.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        gate, up, w, t, a, b = ctx.saved_tensors
        need_gate, need_up = ctx.needs_input_grad[:2]
        # The same ops, in the same order, as _SwiGLU's forward and backward and _Linear's backward.
        lib = ctx.native
        s = F.silu(gate) if lib is None else None
        # The product is the projection's input: only its weight gradients (W, LoRA's A) read it.
        h = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[4]:
            h = (s * up if lib is None else native.swiglu_forward(lib, gate, up)).reshape(-1, gate.shape[-1])
            h = h.to(w.dtype)
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
        needs = (need_gate or need_up,) + ctx.needs_input_grad[2:6]
        grad_h, grad_w, grad_bias, grad_a, grad_b = project_backward(
            dy, h, w, t, a, b, ctx.scaling, needs, ctx.param_dtypes)
        del h
        grad_gate = grad_up = None
        if grad_h is not None:
            grad_h = grad_h.view(gate.shape).to(gate.dtype)
            grad_gate, grad_up = _input_grads(lib, gate, up, grad_h, need_gate, need_up, silu=s)
        return grad_gate, grad_up, grad_w, grad_bias, grad_a, grad_b, None, None


def _forward(self, x):
    gate, up = self.gate_proj(x), self.up_proj(x)
    parts = fused_parts(self.down_proj)
    if parts is None or gate.dtype != up.dtype or gate.shape != up.shape:
        return self.down_proj(swiglu(gate, up))
    device_type = gate.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else gate.dtype
    with torch.autocast(device_type, enabled=False):
        return _SwiGLUDown.apply(gate, up, *parts, dtype)


def use_fused_swiglu(model: torch.nn.Module) -> int:
    """Route the known gated MLPs of ``model`` (SiLU activation) through ``swiglu``; returns how many."""
    n = 0
    for module in model.modules():
        if type(module).__name__ not in MLP_CLASSES:
            continue
        act = getattr(module, "act_fn", None)
        if type(act).__name__ not in _SILU_CLASSES or act._forward_hooks or act._forward_pre_hooks:
            continue
        if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj")):
            continue
        n += swap_forward(module, _forward)
    return n
