"""Exact SFT loss without full-vocabulary logits over every position.

The model is run through its outermost wrapper (DDP / peft / compiled) so wrapper logic (DDP gradient
synchronisation, active LoRA adapters) stays in effect, but with ``logits_to_keep=1`` so the LM head only
runs on one position per row. The final hidden states are captured from the decoder backbone with a forward
hook, gathered at the trained positions (``shift_labels != -100``), and projected to the vocabulary in chunks
with fp32 log-softmax.

Training (a plain linear LM head): ``fused_linear_cross_entropy`` computes each chunk's logits once, and in the
same pass the gradients of the summed loss w.r.t. the hidden states and the head's weight (softmax minus
one-hot, two matmuls); backward only scales them. Logits never outlive their chunk, nothing is recomputed and no
argmax is taken. Memory beyond the backbone is O(chunk_size x vocab) plus one gradient of the head's weight.
Other heads (logit softcapping, adapted heads) and evaluation use the plain chunked path, optionally with
activation checkpointing per chunk (``recompute_chunks``).

The result is a *sum* over tokens plus the token count; the trainer divides by the number of trained tokens
in the whole optimizer step (``num_items_in_batch``), which makes the loss independent of batch size,
gradient accumulation and packing.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
import weakref

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import ConfigError

# Batch keys that go to the model; everything else (labels, shift_labels, seq_lens...) stays out so the model
# never computes its own full-logits loss.
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "cu_seq_lens_q",
    "cu_seq_lens_k",
    "max_length_q",
    "max_length_k",
)


@dataclass
class LossParts:
    """Sum of per-token cross-entropy over trained tokens, their count, and (optionally) argmax hits."""

    loss_sum: torch.Tensor
    n_tokens: torch.Tensor
    n_correct: torch.Tensor | None = None


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying HF causal LM under DDP/DataParallel, torch.compile and peft wrappers.

    peft's LoRA layers are injected into this same module tree, so they remain active when it runs."""
    seen = 0
    while seen < 10:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft PeftModel
            inner = model.get_base_model()
            if inner is model:
                break
            model = inner
        else:
            break
    return model


def _head_parts(base: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module, float | None]:
    """The decoder backbone, the output-embedding module and the final logit softcap of a causal LM."""
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    lm_head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    name = type(base).__name__
    if decoder is None or decoder is base or lm_head is None:
        raise ConfigError(f"{name}: cannot find the decoder backbone and output embeddings for the chunked SFT loss")
    config = base.config
    # Heads that post-process logits in ways we do not reproduce: refuse instead of silently training wrong.
    for attr in ("logit_scale", "logits_scaling", "output_multiplier_scale"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise ConfigError(f"{name}: config.{attr}={value} (scaled LM head) is not supported by the SFT loss")
    softcap = getattr(config, "final_logit_softcapping", None)
    return decoder, lm_head, (float(softcap) if softcap else None)


def _check_attention(base: torch.nn.Module, model_inputs: dict, batch_size: int) -> None:
    """Refuse input layouts the model's attention implementation would silently get wrong."""
    impl = getattr(base.config, "_attn_implementation", None) or ""
    mask = model_inputs.get("attention_mask")
    if "flash" in impl:
        if mask is not None and mask.dim() == 4:
            raise ConfigError(f"attention '{impl}' cannot take a 4-D mask; use the collator's mask_mode='flatten'")
        # Rows with restarting positions and no mask: flash only detects packing at batch size 1.
        if mask is None and "cu_seq_lens_q" not in model_inputs and batch_size > 1:
            raise ConfigError(f"attention '{impl}' with packed rows needs the collator's mask_mode='flatten'")
    elif mask is not None and mask.dim() == 4 and impl not in ("sdpa", "eager"):
        raise ConfigError(f"a 4-D attention mask is only supported with sdpa/eager attention, not '{impl}'")


def _model_inputs(base: torch.nn.Module, inputs: dict, dtype: torch.dtype) -> dict:
    model_inputs = {k: inputs[k] for k in MODEL_INPUT_KEYS if k in inputs and inputs[k] is not None}
    mask = model_inputs.get("attention_mask")
    impl = getattr(base.config, "_attn_implementation", None)
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        if impl == "eager":
            # Eager attention *adds* the mask to the scores, so it needs an additive float mask.
            model_inputs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
                ~mask, torch.finfo(dtype).min
            )
    return model_inputs


def _chunk_ce(
    hidden: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed CE and argmax hits of one chunk; logits exist only inside this call."""
    logits = lm_head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, targets, reduction="sum")
    hits = (logits.detach().argmax(dim=-1) == targets).sum()
    return loss, hits


# Rows of logits per log-softmax pass: 32 x 49k vocabulary in fp32 is 6 MiB, which stays in cache between the
# log-softmax and the exp that turns it into the gradient (one full-size fp32 block cost ~4x as much per row).
_CE_ROWS = 32
# Smallest log-probability whose exp is a normal fp32 number (see _FusedLinearCE.forward).
_LOGP_FLOOR = -87.0
# Rows per product of the hidden-state gradient, (rows x vocab) @ (vocab x hidden): oneDNN (torch 2.13, AMX)
# runs it at ~1.1 TFLOP/s up to 320 rows and ~0.7 from 384 rows on (measured, 49k x 576 head).
_GRAD_H_ROWS = 256
# The head's rows are padded to a multiple of this (see _FusedLinearCE.forward).
_HEAD_ROWS = 64


_frozen_casts: dict = {}


def _frozen_cast(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight.to(dtype)``, kept across steps while the weight is frozen and unchanged (a LoRA run's tied
    embedding / LM head: 49k x 576 cast per step otherwise)."""
    if weight.dtype == dtype or weight.requires_grad or weight.is_inference():
        return weight.to(dtype)
    key = (weight.data_ptr(), weight._version, dtype, weight.shape)
    hit = _frozen_casts.get(id(weight))
    if hit is not None and hit[0] == key and hit[1]() is weight:
        return hit[2]
    cast = weight.to(dtype)
    _frozen_casts.clear()  # one model at a time: never keep casts of weights no longer in use
    wid = id(weight)
    # The entry goes with the weight: a finished run's model does not leave its cast behind.
    _frozen_casts[wid] = (key, weakref.ref(weight, lambda _ref: _frozen_casts.pop(wid, None)), cast)
    return cast


class _FusedLinearCE(torch.autograd.Function):
    """Summed CE of ``hidden @ weight.T (+ bias)`` against ``targets``, with the gradients made in forward.

    The matmuls run in ``dtype`` (bf16 under autocast, as autocast would run the head), log-softmax and all
    accumulation in fp32. The saved gradients are of the *sum*; backward multiplies them by the incoming scalar,
    which is exact for any use of the returned loss (it is a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, dtype):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        n = hidden.shape[0]
        w = _frozen_cast(weight, dtype)
        # Rows padded with zeros to a multiple of _HEAD_ROWS: the matmuls' shapes then repeat from step to step
        # (see FinetuningArguments.pad_tokens_to_multiple_of); zero rows add nothing to the weight's gradient.
        padded = -(-n // _HEAD_ROWS) * _HEAD_ROWS
        h_all = hidden.new_empty((padded, hidden.shape[1]), dtype=dtype)
        h_all[:n] = hidden
        h_all[n:] = 0
        b = bias.to(dtype) if bias is not None else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = hidden.new_empty((padded, hidden.shape[1])) if need_h else None
        grad_w = grad_b = None
        for start in range(0, padded, chunk_size):
            h = h_all[start : start + chunk_size]
            t = targets[start : start + chunk_size]
            logits = h @ w.t() if b is None else torch.addmm(b, h, w.t())
            if t.shape[0] < logits.shape[0] and (need_h or need_w or need_b):  # padding rows: zero gradient
                logits[t.shape[0] :] = 0
            # The (chunk x vocab) block is memory-bound. Row blocks small enough to stay in cache go through
            # fp32 log-softmax once; the gradient d(sum CE)/d(logits) = softmax - one_hot then overwrites the
            # logits in place (in the matmul dtype: one rounding of an fp32 softmax), so no second full-size
            # block is ever allocated. The target entry is made from the fp32 log-prob, so a confident p close to
            # 1 does not lose p - 1 to that rounding.
            for r0 in range(0, t.shape[0], _CE_ROWS):
                block = logits[r0 : min(r0 + _CE_ROWS, t.shape[0])]
                tb = t[r0 : r0 + _CE_ROWS]
                rows = torch.arange(tb.shape[0], device=tb.device)
                logp = F.log_softmax(block, dim=-1, dtype=torch.float32)
                logp_t = logp[rows, tb]
                loss -= logp_t.sum()
                if need_h or need_w or need_b:
                    # exp of log-probs below -87 gives fp32 denormals, which exp and the bf16 conversion
                    # handle ~30x slower than normal numbers (measured: 18 ms instead of 0.6 ms per block once
                    # a model is confident). Clamped, such a probability becomes exp(-87) = 1.6e-38 instead
                    # of something smaller: an error under 1e-33 for a whole row of the gradient.
                    block.copy_(logp.clamp_(min=_LOGP_FLOOR).exp_())
                    block[rows, tb] = (logp_t.exp() - 1.0).to(dtype)
                del logp
            if not (need_h or need_w or need_b):
                continue
            g = logits
            if need_h:
                for r0 in range(0, g.shape[0], _GRAD_H_ROWS):
                    r1 = min(r0 + _GRAD_H_ROWS, g.shape[0])
                    grad_h[start + r0 : start + r1] = g[r0:r1] @ w
            # Usually one chunk: its product is the gradient (no zero-filled vocab x hidden buffer to add into).
            if need_w:
                gw = (g.t() @ h).float()
                grad_w = gw if grad_w is None else grad_w.add_(gw)
            if need_b:
                gb = g.float().sum(0)
                grad_b = gb if grad_b is None else grad_b.add_(gb)
        if grad_h is not None:
            grad_h = grad_h[:n]
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_loss.to(grad_h.dtype)
        # In place: the saved sums are used once (a second backward through this graph fails the saved-tensor
        # version check instead of reading scaled values), and a vocab x hidden copy per step is saved.
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss).to(ctx.weight_dtype)
        if grad_b is not None:
            grad_b = grad_b.mul_(grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None


def fused_linear_cross_entropy(
    hidden: torch.Tensor, lm_head: torch.nn.Linear, targets: torch.Tensor, chunk_size: int = 1024
) -> torch.Tensor:
    """Summed next-token CE of ``lm_head(hidden)`` vs ``targets`` (no ignored entries), in one pass per chunk.

    Runs the head in the autocast dtype when autocast is on for the tensor's device, else in the weight's dtype.
    Gradients equal those of ``F.cross_entropy(lm_head(hidden).float(), targets, reduction="sum")``."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = lm_head.weight.dtype
    return _FusedLinearCE.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_size, dtype)


def _fusable(lm_head: torch.nn.Module, softcap: float | None) -> bool:
    """A plain nn.Linear head (not adapted, no hooks we would bypass) with no logit post-processing."""
    return (
        softcap is None
        and type(lm_head) is torch.nn.Linear
        and not lm_head._forward_hooks
        and not lm_head._forward_pre_hooks
    )


class _NoHead(torch.nn.Module):
    """Stands in for the LM head during the backbone pass: empty logits, no weight cast, no work.

    Even a one-position head call costs a full-vocabulary weight cast under autocast and, for 3-D inputs, a
    copy of the transposed weight (~0.5 s per step for SmolLM2-135M on CPU)."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[..., :0]


@contextmanager
def _head_skipped(base: torch.nn.Module, lm_head: torch.nn.Module):
    """Temporarily replace ``lm_head`` (a direct child of ``base``) by ``_NoHead``; no-op if it is not one."""
    name = next((n for n, child in base.named_children() if child is lm_head), None)
    if name is None:
        yield
        return
    base._modules[name] = _NoHead()
    try:
        yield
    finally:
        base._modules[name] = lm_head


def compute_sft_loss(
    model: torch.nn.Module,
    inputs: dict,
    chunk_size: int = 1024,
    return_correct: bool = False,
    recompute_chunks: bool = True,
) -> LossParts:
    """Sum of next-token cross-entropy over positions with ``shift_labels != -100``, computed chunk-wise.

    ``inputs`` is a collator batch (``sftlab.data.collator.SFTCollator``); if it has no ``shift_labels`` they
    are derived from ``labels`` by shifting each row (only right for unpacked rows). ``chunk_size`` positions
    are projected to the vocabulary at a time; ``recompute_chunks`` recomputes each chunk's logits in backward
    (activation checkpointing) instead of storing them; it only matters where the fused path (training with a
    plain linear head, see ``fused_linear_cross_entropy``) does not apply. A batch without trained tokens gives a zero
    ``loss_sum`` that is still connected to the graph (zero, finite gradients).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shift_labels = inputs.get("shift_labels")
    if shift_labels is None:
        labels = inputs["labels"]
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)

    base = unwrap_model(model)
    decoder, lm_head, softcap = _head_parts(base)
    model_inputs = _model_inputs(base, inputs, next(base.parameters()).dtype)
    _check_attention(base, model_inputs, shift_labels.shape[0])

    if _is_sharded(lm_head):
        return _sharded_head_loss(model, model_inputs, shift_labels, lm_head, softcap, chunk_size, return_correct,
                                  recompute_chunks)
    captured: list[torch.Tensor] = []
    forward_autocast: list[torch.dtype | None] = []

    def grab(_module, _args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden)
        kind = hidden.device.type
        forward_autocast.append(torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None)

    # Run the outermost model (keeps DDP sync and peft hooks); its own LM head is skipped (see _NoHead), or
    # where it cannot be swapped out, made cheap with logits_to_keep=1.
    handle = decoder.register_forward_hook(grab)
    try:
        with _head_skipped(base, lm_head):
            model(**model_inputs, use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one decoder forward pass, saw {len(captured)}")
    hidden = captured[0]
    if hidden.shape[:2] != shift_labels.shape:
        raise ConfigError(
            f"decoder output {tuple(hidden.shape[:2])} does not line up with the labels {tuple(shift_labels.shape)}"
            " (prompt-learning adapters that add virtual tokens are not supported)"
        )

    keep = shift_labels != IGNORE_INDEX
    n_tokens = keep.sum()
    h = hidden[keep]  # (N, H): only trained positions ever reach the LM head
    targets = shift_labels[keep]

    # The head runs in the precision the backbone just ran in, as it would inside the model's own forward. The
    # Trainer (through accelerate) applies bf16 autocast to the model's forward only, and this is outside it:
    # measured on the benchmark, the head then ran its matmuls in fp32, 0.15-0.7 s of a 2-3 s LoRA step.
    device_type = hidden.device.type
    amp_dtype = forward_autocast[0]
    with (torch.autocast(device_type, dtype=amp_dtype)
          if amp_dtype is not None and not torch.is_autocast_enabled(device_type) else nullcontext()):
        loss_sum, n_correct = _head_loss(h, targets, lm_head, softcap, chunk_size, return_correct, recompute_chunks)
    return LossParts(loss_sum=loss_sum, n_tokens=n_tokens, n_correct=n_correct if return_correct else None)


def _is_sharded(lm_head: torch.nn.Module) -> bool:
    """True when FSDP2 (``fully_shard``) manages the head: its weight is whole only inside the model's forward."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed support
        return False
    return isinstance(lm_head, FSDPModule)


def _sharded_head_loss(model, model_inputs: dict, shift_labels: torch.Tensor, lm_head: torch.nn.Module,
                       softcap: float | None, chunk_size: int, return_correct: bool,
                       recompute_chunks: bool) -> LossParts:
    """The SFT loss with an FSDP2-sharded head, computed *inside* the head's forward call.

    FSDP gathers a sharded module's weight only around its forward (and its backward, triggered by gradients
    reaching that forward's outputs); outside it the weight is a shard. So instead of skipping the head and
    projecting the captured hidden states afterwards, the model runs with every position kept and the head's
    forward is replaced, for this call only, by the loss over the trained positions: the same fused or chunked
    computation as ``compute_sft_loss``, on the gathered weight, and its summed loss is the head's output, so
    FSDP's hooks see it and reduce the head's gradient after its backward."""
    keep = shift_labels != IGNORE_INDEX
    targets = shift_labels[keep]
    result: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    def project(x):
        return F.linear(x, lm_head.weight, lm_head.bias)

    def head_forward(hidden_states):
        if hidden_states.shape[:2] != shift_labels.shape:
            raise ConfigError(f"decoder output {tuple(hidden_states.shape[:2])} does not line up with the labels "
                              f"{tuple(shift_labels.shape)}")
        h = hidden_states[keep]
        if (h.shape[0] and torch.is_grad_enabled() and not return_correct and softcap is None
                and isinstance(lm_head, torch.nn.Linear)):
            loss_sum, n_correct = fused_linear_cross_entropy(h, lm_head, targets, chunk_size), None
        else:
            loss_sum, n_correct = _head_loss(h, targets, project, softcap, chunk_size, return_correct,
                                             recompute_chunks)
        result.append((loss_sum, n_correct))
        return loss_sum

    lm_head.forward = head_forward  # an instance attribute: nn.Module.__call__ (and FSDP's hooks) run around it
    try:
        model(**model_inputs, use_cache=False, logits_to_keep=0)
    finally:
        del lm_head.forward
    if len(result) != 1:
        raise RuntimeError(f"expected one LM head call, saw {len(result)}")
    loss_sum, n_correct = result[0]
    return LossParts(loss_sum=loss_sum, n_tokens=keep.sum(), n_correct=n_correct)


def _head_loss(h, targets, lm_head, softcap, chunk_size, return_correct, recompute_chunks):
    """(summed CE, argmax hits or None) of the head over the gathered trained positions ``h``."""
    if h.shape[0] == 0:
        # Empty projection: an exact 0 connected to backbone and head, so every parameter gets a zero grad.
        loss_sum = lm_head(h).float().sum()
        n_correct = torch.zeros((), dtype=torch.long, device=h.device)
    elif torch.is_grad_enabled() and not return_correct and _fusable(lm_head, softcap):
        loss_sum = fused_linear_cross_entropy(h, lm_head, targets, chunk_size)
        n_correct = None
    else:
        parts, hits = [], []
        for start in range(0, h.shape[0], chunk_size):
            args = (h[start : start + chunk_size], targets[start : start + chunk_size], lm_head, softcap)
            if recompute_chunks and torch.is_grad_enabled():
                loss, hit = checkpoint(_chunk_ce, *args, use_reentrant=False)
            else:
                loss, hit = _chunk_ce(*args)
            parts.append(loss)
            hits.append(hit)
        loss_sum = torch.stack(parts).sum()
        n_correct = torch.stack(hits).sum()
    return loss_sum, n_correct
