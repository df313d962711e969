"""Linear layers for CPU training: one autograd function each, sharing one low-precision copy of each input.

Under bf16 autocast a decoder layer's q, k and v projections (and gate and up) each cast the same fp32 normed
hidden state to bf16 and each keep their own copy for backward. peft's ``lora.Linear.forward`` adds more: it casts
x to the adapter's fp32 dtype and autocast casts it straight back (two copies of the activation, two more in
backward), scales the full-width output (``* scaling`` on N x out instead of N x r) and adds two full-width
results. Measured on SmolLM2-135M, LoRA r=16 on all linear layers, ~1200 tokens: the 1536-wide casts alone
were 8% of a step.

``linear`` computes ``y = x W^T + b + s (x A^T) B^T`` (the LoRA term optional) in the compute dtype: the input
is cast once per distinct tensor (``_CastCache``), the scaling is applied to the rank-r factor, the adapter
product is accumulated into the base output in place (``addmm_``), and backward makes ``dx = dy W + (s dy B) A``
with one in-place accumulation. Parameters keep their dtypes (fp32 master weights) and get gradients in them.
Numbers equal autocast's / peft's up to rounding order (tests: fp64 gradcheck, fp32 against peft and
nn.Linear, bf16 accuracy against the fp32 run).

``use_fused_linears`` swaps the forward of every plain peft ``lora.Linear`` and every plain ``nn.Linear`` inside
them or beside them (not the LM head, which the loss handles). A LoRA layer in a state the function does not cover
(adapters disabled or merged, several active adapters, a variant such as DoRA, dropout, per-call
``adapter_names``, hooks) takes peft's own forward on that call.
"""

from __future__ import annotations

import types
import weakref

import torch


class _CastCache:
    """The last input cast to the compute dtype, keyed by tensor identity and version (in-place edits miss)."""

    def __init__(self):
        self.key = None
        self.value = None

    def get(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if x.dtype == dtype:
            return x.reshape(-1, x.shape[-1])
        if x.is_inference():  # no version counter to key on (and no backward to save for)
            return x.reshape(-1, x.shape[-1]).to(dtype)
        key = (weakref.ref(x), x._version, dtype)
        if self.key is not None and self.key[0]() is x and self.key[1:] == key[1:]:
            return self.value
        self.value = x.reshape(-1, x.shape[-1]).to(dtype)
        self.key = key
        return self.value


_cast_cache = _CastCache()


def project(x2, w, bias, a, b, scaling):
    """``(x2 W^T + b + s (x2 A^T) B^T, s x2 A^T)`` on 2-D ``x2``; every tensor already in the compute dtype."""
    y = x2 @ w.t() if bias is None else torch.addmm(bias, x2, w.t())
    t = None
    if a is not None:
        t = x2 @ a.t()
        t.mul_(scaling)  # (N, r): scaling the rank-r factor costs r/out of scaling the output
        y.addmm_(t, b.t())
    return y, t


def project_backward(dy, x2, w, t, a, b, scaling, needs, param_dtypes):
    """Gradients of ``project`` from 2-D ``dy`` (compute dtype): ``(dx2 in the compute dtype, dW, db, dA, dB)``
    with the parameter gradients in the parameters' own dtypes; None where ``needs`` says no."""
    need_x, need_w, need_bias, need_a, need_b = needs
    w_dtype, bias_dtype, a_dtype, b_dtype = param_dtypes
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    u = None
    if a is not None and (need_x or need_a):
        u = dy @ b
        u.mul_(scaling)  # (N, r): d loss / d (x A^T), scaled
        if need_a:
            grad_a = (u.t() @ x2).to(a_dtype)
    if need_x:
        grad_x = dy @ w
        if u is not None:
            grad_x.addmm_(u, a)
    if b is not None and need_b:
        grad_b = (dy.t() @ t).to(b_dtype)
    if need_w:
        grad_w = (dy.t() @ x2).to(w_dtype)
    if need_bias:
        grad_bias = dy.sum(0).to(bias_dtype)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


def cast_params(weight, bias, lora_a, lora_b, dtype):
    """The parameters in the compute dtype, and their own dtypes (for their gradients)."""
    dtypes = tuple(p.dtype if p is not None else None for p in (weight, bias, lora_a, lora_b))
    cast = tuple(p.to(dtype) if p is not None else None for p in (weight, bias, lora_a, lora_b))
    return cast, dtypes


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dtype):
        shape = x.shape
        x2 = _cast_cache.get(x, dtype)
        (w, b0, a, b), ctx.param_dtypes = cast_params(weight, bias, lora_a, lora_b, dtype)
        y, t = project(x2, w, b0, a, b, scaling)
        ctx.save_for_backward(x2, w, t, a, b)
        ctx.scaling = scaling
        ctx.x_dtype = x.dtype
        ctx.x_shape = shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, w, t, a, b = ctx.saved_tensors
        dy = grad_y.reshape(-1, grad_y.shape[-1]).to(w.dtype)
        grad_x, grad_w, grad_bias, grad_a, grad_b = project_backward(
            dy, x2, w, t, a, b, ctx.scaling, ctx.needs_input_grad[:5], ctx.param_dtypes)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None


def linear(x, weight, bias=None, lora_a=None, lora_b=None, scaling: float = 1.0, dtype: torch.dtype | None = None):
    """``x W^T + b (+ scaling * (x A^T) B^T)`` with the matmuls in ``dtype`` (default: autocast's, else x's)."""
    device_type = x.device.type
    if dtype is None:
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    # The function chooses every dtype itself; autocast would only add casts of tensors that are already right.
    with torch.autocast(device_type, enabled=False):
        return _Linear.apply(x, weight, bias, lora_a, lora_b, float(scaling), dtype)


def _plain_adapter(layer) -> str | None:
    """The one active adapter if this call can take the fused path, else None."""
    if layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    base = layer.base_layer
    if type(base) is not torch.nn.Linear or base._forward_hooks or base._forward_pre_hooks:
        return None
    if layer.lora_A[name]._forward_hooks or layer.lora_B[name]._forward_hooks:
        return None
    return name


def fused_parts(module: torch.nn.Module):
    """``(weight, bias, lora_a, lora_b, scaling)`` of a layer whose call would take ``linear`` right now (a layer
    routed by ``use_fused_linears``, in a state it covers), else None: callers that fuse more around the
    projection fall back to calling the module."""
    if getattr(module, "_sftlab_original_forward", None) is None or module._forward_hooks \
            or module._forward_pre_hooks:
        return None
    if type(module) is torch.nn.Linear:
        return module.weight, module.bias, None, None, 1.0
    if getattr(module.forward, "__func__", None) is not _lora_forward:
        return None
    name = _plain_adapter(module)
    if name is None:
        return None
    base = module.base_layer
    return (base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
            float(module.scaling[name]))


def _lora_forward(self, x, *args, **kwargs):
    name = None if (args or kwargs) else _plain_adapter(self)
    if name is None:
        return self._sftlab_original_forward(x, *args, **kwargs)
    base = self.base_layer
    return linear(x, base.weight, base.bias, self.lora_A[name].weight, self.lora_B[name].weight,
                  self.scaling[name])


def _linear_forward(self, x):
    return linear(x, self.weight, self.bias)


def swap_forward(module: torch.nn.Module, forward) -> bool:
    """Make ``forward(module, ...)`` the module's forward, keeping the original as ``_sftlab_original_forward`` for
    the cases it does not cover. Not twice, and not on modules with hooks (they expect the original)."""
    if hasattr(module, "_sftlab_original_forward") or module._forward_hooks or module._forward_pre_hooks:
        return False
    module._sftlab_original_forward = module.forward
    module.forward = types.MethodType(forward, module)
    return True


def use_fused_linears(model: torch.nn.Module, skip: tuple[torch.nn.Module, ...] = ()) -> tuple[int, int]:
    """Route plain peft ``lora.Linear`` layers and the plain ``nn.Linear`` layers outside them (except ``skip``)
    through ``linear``; returns (LoRA layers, plain layers) newly routed."""
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        LoraLinear = None
    inside_lora: set[int] = set()
    n_lora = n_plain = 0
    for module in model.modules():
        if LoraLinear is not None and type(module) is LoraLinear:
            inside_lora.update(id(m) for m in module.modules() if m is not module)
            n_lora += swap_forward(module, _lora_forward)
    skip_ids = {id(m) for m in skip} | inside_lora
    for module in model.modules():
        if type(module) is torch.nn.Linear and id(module) not in skip_ids:
            n_plain += swap_forward(module, _linear_forward)
    return n_lora, n_plain
