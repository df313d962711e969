"""`apply`: switch a model to sftlab's CPU speed paths, and the one batch hook the trainer calls before each pass.

Everything here leaves the results as they are (same arithmetic, up to floating-point rounding):

* sdpa -> ``"sftlab_varlen"`` attention (`sftlab.accel.attention`): batches become one padding-free row and
  attention runs per example, instead of over padding or one dense mask over a whole pack.
* Linear and LoRA layers run as one autograd function each (`sftlab.accel.linear`): the same arithmetic as
  autocast / peft's forward, with one bf16 copy of each layer input instead of one per projection. Llama-style
  RMSNorms (`sftlab.accel.norm`) and rotary embeddings (`sftlab.accel.rotary`) likewise; gated MLPs keep two of
  their four activations (`sftlab.accel.swiglu`).
* With ``store_frozen_in_bf16``, frozen linear weights are stored in bf16: autocast would round them to bf16 for
  every matmul of every step anyway. Trained weights, the embedding / tied LM head and norms stay fp32.
* glibc keeps freed memory for the next step, and weights still backed by the checkpoint's file mapping are copied
  out so the mapping goes (`sftlab.accel.allocator`).
* sftlab's native kernels (`sftlab.accel.native`) are built now, if not cached, rather than in the first step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sftlab.accel.options import AccelOptions


@dataclass
class Applied:
    """What `apply` changed (one line each, for ``--verbose``) and the hook for each forward pass's batch."""

    changes: list[str] = field(default_factory=list)
    batch_hook: Callable[[dict], dict] | None = None


def apply(model, options: AccelOptions) -> Applied:
    """Switch ``model`` (plain or peft-wrapped, on CPU) to the speed paths; returns what changed and the hook."""
    from sftlab.accel import native
    from sftlab.accel.allocator import own_file_backed_tensors, retain_freed_memory

    base = _unwrap(model)
    done: list[str] = []
    varlen = _use_varlen_attention(base, done)
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    _use_fused_layers(model, head, done)
    if options.store_frozen_in_bf16:
        _store_frozen_in_bf16(model, head, done)
    if native.prepare(_head_dim(base.config)):
        done.append("native CPU kernels (attention, gated MLP, RMSNorm, rotary) built or loaded from the cache")
    else:
        done.append("native CPU kernels not available here (see the warning, if any): torch's ops instead")
    n_owned = own_file_backed_tensors(model)
    if n_owned:
        done.append(f"{n_owned} tensors copied out of the checkpoint's file mapping (so the mapping is released)")
    if retain_freed_memory():
        done.append("freed memory kept for the next step (glibc mallopt)")
    multiple = options.pad_tokens_to_multiple_of if varlen else 0
    return Applied(changes=done, batch_hook=BatchHook(model, pad_to_multiple_of=multiple, varlen=varlen))


def _unwrap(model):
    from sftlab.train.loss import unwrap_model

    return unwrap_model(model)


def _use_varlen_attention(base, done: list[str]) -> bool:
    from sftlab.accel.attention import register_varlen_attention

    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    base.set_attn_implementation(register_varlen_attention())
    done.append("per-example (varlen) attention on padding-free batches")
    return True


def _use_fused_layers(model, head, done: list[str]) -> None:
    from sftlab.accel.linear import use_fused_linears
    from sftlab.accel.norm import use_fused_rms_norms
    from sftlab.accel.rotary import use_fused_rotary
    from sftlab.accel.swiglu import use_fused_swiglu

    n_lora, n_plain = use_fused_linears(model, skip=(head,) if head is not None else ())
    if n_lora or n_plain:
        done.append(f"{n_lora} LoRA and {n_plain} plain linear layers as fused autograd functions")
    n_norms = use_fused_rms_norms(model)
    if n_norms:
        done.append(f"{n_norms} RMSNorm layers as fused autograd functions")
    n_mlps = use_fused_swiglu(model)
    if n_mlps:
        done.append(f"{n_mlps} gated MLPs keep gate and up only for backward (silu and product recomputed)")
    for name in use_fused_rotary(model):
        done.append(f"rotary embedding of {name} as a fused autograd function")


def _store_frozen_in_bf16(model, head, done: list[str]) -> None:
    import torch

    n = 0
    for module in model.modules():
        if type(module) is not torch.nn.Linear or module is head or module.weight.requires_grad:
            continue
        if head is not None and module.weight is head.weight:
            continue
        module.weight.data = module.weight.data.to(torch.bfloat16)
        if module.bias is not None and not module.bias.requires_grad:
            module.bias.data = module.bias.data.to(torch.bfloat16)
        n += 1
    if n:
        done.append(f"{n} frozen linear weights stored in bf16")


def _head_dim(config) -> int | None:
    if getattr(config, "head_dim", None):
        return config.head_dim
    heads = getattr(config, "num_attention_heads", 0)
    return config.hidden_size // heads if heads else None


class BatchHook:
    """Called by the trainer on the batch of every forward pass (training and evaluation), before the loss.

    * The first training pass: the heap memory it will need is touched beforehand (`allocator.prefault_heap`):
      an estimate from the pass's tokens and the model's size, kept below what the pass allocates.
    * Padding-free batches under the per-example attention: padded to a multiple of ``pad_to_multiple_of`` tokens
      with one unlabelled segment of its own, and given an all-ones 2-D mask, which tells transformers there is
      no padding, so it builds no mask (instead of a dense N x N one from the packed positions); the attention
      keeps to each example through ``cu_seq_lens_q``.
    """

    def __init__(self, model, pad_to_multiple_of: int = 0, varlen: bool = True):
        self.model = model
        self.pad_to_multiple_of = pad_to_multiple_of
        self.varlen = varlen
        self.prefaulted = False

    def __call__(self, inputs: dict) -> dict:
        if not self.prefaulted and self.model.training:
            self.prefaulted = True
            self._prefault(int(inputs["input_ids"].numel()))
        if not self.varlen or "cu_seq_lens_q" not in inputs or inputs["input_ids"].shape[0] != 1:
            return inputs
        return with_flat_batch_shape(inputs, self.pad_to_multiple_of)

    def _prefault(self, n_tokens: int) -> None:
        from sftlab.accel import allocator

        config = getattr(_unwrap(self.model), "config", None)
        layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
        if layers and hidden:
            allocator.prefault_heap(n_tokens * layers * hidden * allocator.PREFAULT_BYTES_PER_UNIT)


def with_flat_batch_shape(inputs: dict, pad_to_multiple_of: int) -> dict:
    """A padding-free (``"flatten"``) batch padded to a multiple of ``pad_to_multiple_of`` tokens (0/1: as it is),
    with an all-ones 2-D attention mask where it has none."""
    import torch
    import torch.nn.functional as F

    from sftlab.data.collator import pad_flat_batch
    from sftlab.data.tokenize import IGNORE_INDEX

    if pad_to_multiple_of > 1:
        if inputs.get("shift_labels") is None:
            inputs = dict(inputs, shift_labels=F.pad(inputs["labels"][:, 1:], (0, 1), value=IGNORE_INDEX))
        inputs = pad_flat_batch(inputs, pad_to_multiple_of)
    if inputs.get("attention_mask") is None:
        ids = inputs["input_ids"]
        inputs = dict(inputs, attention_mask=torch.ones(ids.shape, dtype=torch.bool, device=ids.device))
    return inputs
