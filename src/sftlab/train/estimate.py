"""What a training run will cost, before it runs: optimizer steps, tokens, padding, peak memory and wall time.

* Batching (`plan_batches`) follows what the Trainer will do with the kept examples' lengths: packs from
  `data.packing.bfd_pack`, the sampler's order (transformers' `LengthGroupedSampler` for group_by_length, else a
  seeded shuffle), padded rows or one padding-free row per batch (`collator.mask_mode_for_attention`), pieces of
  at most `max_tokens_per_forward` tokens (`collator.split_spans`, as `split_flat_batch` cuts them) and, under
  sftlab's CPU attention, each piece padded to `pad_tokens_to_multiple_of`.
* Memory (`estimate_memory`): the model is built on the meta device (no weights read) to count parameters;
  weights + gradients + optimizer state + activations of the largest forward piece + the LM-head chunk + the
  tokenized data set + the process itself (measured: the interpreter with torch, transformers and the tokenizer).
  The per-token activation constants are derived from what a decoder layer keeps for backward (see
  `_activation_bytes_per_token`).
* Time: from a measured probe (`sftlab.probe`): a few real optimizer steps in a child process, the first on
  the longest examples (the warm-up; it also gives the measured peak memory), the rest on typical batches, drawn
  to hold the run's mean tokens per optimizer step (`report.probe_choice`): their seconds per token, measured
  after the warm-up, times the run's tokens, plus the warm-up's extra.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from sftlab.data.collator import mask_mode_for_attention, split_spans
from sftlab.data.packing import bfd_pack

# Memory held per token of the tokenized training set while it trains: the examples are a memory-mapped Arrow file
# (sftlab.data.store), int32 input_ids and labels, whose pages count in the resident set once an epoch has read them.
DATA_BYTES_PER_TOKEN = 8


@dataclass
class BatchPlan:
    batching: str  # a sentence saying how batches are formed
    examples: int
    rows: int  # examples, or packs when packing
    batches_per_epoch: int
    steps_per_epoch: int
    optimizer_steps: int
    epochs: float
    tokens_per_epoch: int  # real tokens
    computed_tokens_per_epoch: int  # real + padding, as the model runs them
    padding_share: float
    forward_passes_per_epoch: int
    largest_forward_tokens: int  # the activation-memory driver
    largest_trained_tokens: int = 0  # trained positions of that forward pass (bounded by the loss chunk)


def _order(row_lengths: list[int], group_by_length: bool, group_size: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator()
    g.manual_seed(seed)
    if group_by_length:
        from transformers.trainer_pt_utils import LengthGroupedSampler

        return list(LengthGroupedSampler(group_size, lengths=row_lengths, generator=g))
    return torch.randperm(len(row_lengths), generator=g).tolist()


def plan_batches(lengths, trained_lengths, *, batch_size: int, grad_accum: int, epochs: float, max_steps: int,
                 packing: bool, cutoff_len: int, attn_implementation: str, on_cpu: bool, group_by_length: bool,
                 max_tokens_per_forward: int | None, pad_to_multiple_of: int, seed: int = 42,
                 world_size: int = 1) -> BatchPlan:
    """The batches one epoch of training forms from examples of these lengths (trained_lengths: their trained
    token counts, for the loss-head memory)."""
    lengths = [int(n) for n in lengths]  # plain ints (numpy ones do not go into JSON)
    trained_lengths = [int(n) for n in trained_lengths]
    if packing:
        rows = [[lengths[i] for i in b] for b in bfd_pack(lengths, cutoff_len)]
        row_trained = [sum(trained_lengths[i] for i in b) for b in bfd_pack(lengths, cutoff_len)]
    else:
        rows = [[n] for n in lengths]
        row_trained = trained_lengths
    totals = [sum(r) for r in rows]
    attn = "sftlab_varlen" if (on_cpu and attn_implementation == "sdpa") else attn_implementation
    flat = mask_mode_for_attention(attn) == "flatten"
    per_rank = batch_size
    order = _order(totals, group_by_length and not flat and not packing, per_rank * grad_accum, seed)
    budget = max_tokens_per_forward if (flat and max_tokens_per_forward and world_size == 1) else None
    multiple = pad_to_multiple_of if (flat and attn == "sftlab_varlen" and pad_to_multiple_of > 1) else 0
    computed = passes = largest = largest_trained = 0
    n_batches = 0
    for start in range(0, len(order), per_rank * world_size):
        batch = order[start:start + per_rank * world_size]
        n_batches += 1
        if not flat:
            width = max(totals[i] for i in batch)
            computed += width * len(batch)
            passes += 1
            if width * len(batch) > largest:
                largest, largest_trained = width * len(batch), sum(row_trained[i] for i in batch)
            continue
        segs = [n for i in batch for n in rows[i] if n]
        bounds = [0]
        for n in segs:
            bounds.append(bounds[-1] + n)
        trained_bounds = [0]
        for i in batch:
            trained_bounds.append(trained_bounds[-1] + row_trained[i])
        for a, e in (split_spans(bounds, budget) if budget else [(0, bounds[-1])]):
            n = e - a
            padded = n + ((-n) % multiple if multiple else 0)
            computed += padded
            passes += 1
            if padded > largest:
                largest, largest_trained = padded, min(n, trained_bounds[-1])
    if flat:
        how = "one padding-free row per batch (per-example attention)"
        if budget:
            how += f", forward passes of at most {budget} tokens"
        if multiple:
            how += f", each padded to a multiple of {multiple}"
    else:
        how = "padded rows" + (" grouped by length" if group_by_length and not packing else " in random order")
    if packing:
        how = f"packed rows of up to {cutoff_len} tokens; " + how
    n_batches_rank = math.ceil(len(rows) / (per_rank * world_size)) if rows else 0
    per_epoch = max(n_batches_rank // grad_accum + int(n_batches_rank % grad_accum > 0), 1)
    steps = max_steps if max_steps and max_steps > 0 else math.ceil(epochs * per_epoch)
    real = sum(totals)
    return BatchPlan(how, len(lengths), len(rows), n_batches, per_epoch, steps, epochs, real, computed,
                     round(1 - real / computed, 4) if computed else 0.0, passes, largest, largest_trained)


# ---- memory -----------------------------------------------------------------------------------------------------
@dataclass
class ModelShape:
    params: int
    trainable: int
    frozen_linear_params: int  # stored in bf16 under LoRA + bf16 on CPU (sftlab.accel.apply)
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int


def model_shape(cfg) -> ModelShape:
    """Parameter counts of the model as training would prepare it, from a copy built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.models.load import adapter_base, prepare_for_finetuning, resolve_model_path

    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    if adapter_base(path) is not None:
        path = resolve_model_path(adapter_base(path), cfg.model.cache_dir)
    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        model = prepare_for_finetuning(model, cfg.finetuning)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    head = model.get_output_embeddings()
    frozen_linear = sum(m.weight.numel() for m in model.modules()
                        if type(m) is torch.nn.Linear and m is not head and not m.weight.requires_grad)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 1)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv = getattr(text, "num_key_value_heads", heads) * head_dim
    return ModelShape(params, trainable, frozen_linear, text.num_hidden_layers, text.hidden_size,
                      getattr(text, "intermediate_size", 4 * text.hidden_size), kv, text.vocab_size)


def _activation_bytes_per_token(m: ModelShape, bf16: bool) -> float:
    """Bytes one decoder layer keeps for backward per token. Under bf16 autocast: the residual-stream inputs of the
    two norms in fp32 (2 x 4h), one bf16 copy of each linear's input (q/k/v share one; o, gate/up, down: h, h, I),
    q, k, v and the attention output in bf16 (2h + 2kv), gate and up in bf16 (2I), plus the norms' and attention's
    small per-token statistics. fp32 runs keep the same tensors in 4 bytes."""
    e = 2 if bf16 else 4
    h, i, kv = m.hidden, m.intermediate, m.kv_dim
    return 8 * h + e * (h + h + h + i) + e * (2 * h + 2 * kv) + e * 2 * i + 16


@dataclass
class MemoryEstimate:
    process: int  # the interpreter with torch and transformers imported, measured
    weights: int
    gradients: int
    optimizer: int
    activations: int
    loss_head: int
    data: int
    total: int = 0

    def __post_init__(self):
        self.total = self.process + self.weights + self.gradients + self.optimizer + self.activations + \
            self.loss_head + self.data


def _optimizer_bytes_per_param(optim: str) -> int:
    optim = str(getattr(optim, "value", optim)).lower()
    if "sgd" in optim:
        return 0
    if "adafactor" in optim:
        return 0  # factored second moments: negligible next to the weights
    if "8bit" in optim:
        return 2
    return 8  # Adam/AdamW: two fp32 moments


def estimate_memory(m: ModelShape, plan: BatchPlan, *, finetuning_type: str, bf16: bool, on_cpu: bool,
                    optim: str, loss_chunk_size: int, process_bytes: int, data_in_process: bool = False) -> MemoryEstimate:
    frozen_bf16 = finetuning_type == "lora" and bf16 and on_cpu
    weights = 4 * m.params - (2 * m.frozen_linear_params if frozen_bf16 else 0)
    act = int(_activation_bytes_per_token(m, bf16) * m.layers * plan.largest_forward_tokens)
    # The LM head runs over at most loss_chunk_size trained positions at a time: logits (bf16 under autocast)
    # plus their fp32 softmax and gradient.
    chunk = min(max(plan.largest_trained_tokens, 1), loss_chunk_size)
    head = chunk * m.vocab * ((2 if bf16 else 4) + 4 + 4)
    return MemoryEstimate(process=process_bytes, weights=weights, gradients=4 * m.trainable,
                          optimizer=_optimizer_bytes_per_param(optim) * m.trainable, activations=act,
                          loss_head=head, data=0 if data_in_process else DATA_BYTES_PER_TOKEN * plan.tokens_per_epoch)


def process_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


# ---- the whole estimate -----------------------------------------------------------------------------------------
@dataclass
class CostEstimate:
    plan: BatchPlan
    memory: MemoryEstimate | None
    memory_note: str = ""
    probe: dict | None = None  # sftlab.probe's measurements
    train_seconds: float | None = None  # estimated train_runtime (the Trainer's), from the probe
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"plan": asdict(self.plan), "memory": asdict(self.memory) if self.memory else None,
                "memory_note": self.memory_note, "probe": self.probe, "train_seconds": self.train_seconds,
                "peak_memory_bytes": self.peak_memory_bytes(), "notes": self.notes}

    def peak_memory_bytes(self) -> int | None:
        """The probe's measured peak (plus the data the full set adds) when it ran, else the analytic total."""
        if self.memory is None:
            return None
        if self.probe and self.probe.get("peak_rss"):
            extra = DATA_BYTES_PER_TOKEN * max(self.plan.tokens_per_epoch - self.probe.get("data_tokens", 0), 0)
            return int(self.probe["peak_rss"] + extra)
        return self.memory.total


def plan_for(cfg, lengths, trained_lengths) -> BatchPlan:
    import torch

    t, f = cfg.training, cfg.finetuning
    strategy = str(getattr(t.train_sampling_strategy, "value", t.train_sampling_strategy))
    on_cpu = not torch.cuda.is_available() or getattr(t, "use_cpu", False)
    attn = cfg.model.attn_implementation
    # As run_sft: without a varlen kernel and without packing, sftlab groups by length unless told otherwise.
    grouped = strategy == "group_by_length" or (
        "train_sampling_strategy" not in cfg.explicit and not cfg.data.packing
        and mask_mode_for_attention("sftlab_varlen" if on_cpu and attn == "sdpa" else attn) == "auto")
    return plan_batches(lengths, trained_lengths, batch_size=t.per_device_train_batch_size,
                        grad_accum=t.gradient_accumulation_steps, epochs=t.num_train_epochs, max_steps=t.max_steps,
                        packing=cfg.data.packing, cutoff_len=cfg.data.cutoff_len, attn_implementation=attn,
                        on_cpu=on_cpu, group_by_length=grouped, max_tokens_per_forward=f.max_tokens_per_forward,
                        pad_to_multiple_of=f.pad_tokens_to_multiple_of, seed=t.seed,
                        world_size=max(int(os.environ.get("WORLD_SIZE", "1")), 1))


def estimate_cost(cfg, lengths, trained_lengths, process_bytes: int, data_in_process: bool = False) -> CostEstimate:
    """Batches, steps and memory for training on examples of these lengths (no probe). `data_in_process`: the
    measured process already holds the tokenized data (true inside `sftlab train`)."""
    import torch

    plan = plan_for(cfg, lengths, trained_lengths)
    on_cpu = not torch.cuda.is_available() or getattr(cfg.training, "use_cpu", False)
    try:
        shape = model_shape(cfg)
    except Exception as e:  # a GGUF file or remote code: counted only by loading it
        return CostEstimate(plan, None, f"no memory estimate: the model's shape is unknown here ({e})")
    mem = estimate_memory(shape, plan, finetuning_type=cfg.finetuning.finetuning_type, bf16=bool(cfg.training.bf16),
                          on_cpu=on_cpu, optim=cfg.training.optim, loss_chunk_size=cfg.finetuning.loss_chunk_size,
                          process_bytes=process_bytes, data_in_process=data_in_process)
    return CostEstimate(plan, mem)


def add_probe(est: CostEstimate, probe: dict) -> None:
    """Wall time from the probe: seconds per real token of its later (typical, after warm-up) steps times the run's
    tokens, plus the first step's extra (kernel builds, first-touch of memory) over what its tokens would take."""
    est.probe = probe
    steps = probe.get("steps") or []
    later = steps[1:]
    if not later:
        est.notes.append("the probe ran fewer than two steps: no time estimate")
        return
    secs, toks = sum(s["seconds"] for s in later), sum(s["tokens"] for s in later)
    if toks <= 0:
        return
    per_token = secs / toks
    first_extra = max(steps[0]["seconds"] - steps[0]["tokens"] * per_token, 0.0)
    epochs_tokens = est.plan.tokens_per_epoch * (est.plan.optimizer_steps / max(est.plan.steps_per_epoch, 1))
    est.train_seconds = round(first_extra + epochs_tokens * per_token, 1)
