"""Batched generation for evaluation/prediction, and the predictions JSONL writer.

Prompts arrive already tokenized (the template decides the exact ids), so batching pads the id lists itself:
on the LEFT, so that every row's last prompt token sits at the same position and new tokens are appended
right after it. The caller's tokenizer is never touched (no padding_side flip to undo).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from sftlab.config import GeneratingArguments

__all__ = [
    "GenerationResult",
    "build_generation_config",
    "cut_at_stop",
    "generate_batched",
    "model_device",
    "pad_token_id",
    "write_predictions",
]


@dataclass
class GenerationResult:
    """Output of :func:`generate_batched`, in the caller's prompt order."""

    sequences: list[list[int]]  # new ids per prompt, cut before the first stop token
    texts: list[str]  # decoded sequences (special tokens skipped, stripped)
    new_tokens: int  # tokens the model produced, each row up to and including its stop token
    seconds: float  # wall time spent in generate()

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def pad_token_id(tokenizer, stop_token_ids: Sequence[int] = ()) -> int:
    """The tokenizer's pad id, else its eos id (many causal LMs ship without a pad token), else a stop id, else 0.

    Which id pads does not matter for the output: padded positions are masked out of attention.
    """
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, *stop_token_ids):
        if candidate is not None:
            return int(candidate)
    return 0


def model_device(model):
    """Device of the model's first parameter (works for plain and PeftModel-wrapped models)."""
    return next(model.parameters()).device


def build_generation_config(gen_args: GeneratingArguments, stop_token_ids: Sequence[int], pad_id: int):
    """A GenerationConfig from GeneratingArguments: greedy unless do_sample; stops at any of stop_token_ids."""
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = dict(
        max_new_tokens=gen_args.max_new_tokens,
        do_sample=gen_args.do_sample,
        repetition_penalty=gen_args.repetition_penalty,
        pad_token_id=pad_id,
        use_cache=True,
    )
    if gen_args.do_sample:
        # Only meaningful when sampling; passing them to greedy search makes transformers warn.
        kwargs.update(temperature=gen_args.temperature, top_p=gen_args.top_p, top_k=gen_args.top_k)
    # generate() accepts a list and stops a row at the first id from it. Always set it, even empty: a None here
    # would be filled in from the model's own generation_config, i.e. stop ids the caller did not ask for.
    kwargs["eos_token_id"] = [int(t) for t in stop_token_ids]
    return GenerationConfig(**kwargs)


def cut_at_stop(ids: Sequence[int], stop_token_ids: Sequence[int]) -> tuple[list[int], bool]:
    """ids up to (excluding) the first stop id, and whether a stop id was found."""
    stops = set(int(t) for t in stop_token_ids)
    for i, tok in enumerate(ids):
        if int(tok) in stops:
            return [int(t) for t in ids[:i]], True
    return [int(t) for t in ids], False


def generation_precision(model, amp: str | None = None):
    """The one decision of the precision generation runs in (sftlab's predict, eval and end-to-end tests):

    * on a GPU, a run trained with ``amp`` = "bf16" / "fp16" autocasts to it, which pays off there;
    * never otherwise on CPU: autocast re-casts every weight at every decoding step, which measured 2-3x slower than
      fp32 (benchmarks/results/generation_bf16_small.json); a model loaded in bf16 stays bf16;
    * except a model that holds both fp32 and bf16 weights (a LoRA model straight from training keeps its frozen
      weights in bf16 and its adapter in fp32): bf16 autocast, so its matmuls see one dtype.
    """
    import contextlib

    import torch

    device = model_device(model).type
    if amp in ("bf16", "fp16") and device == "cuda":
        return torch.autocast(device, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if torch.bfloat16 in dtypes and len(dtypes) > 1:
        return torch.autocast(device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cut_text(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        at = text.find(s)
        if at >= 0:
            cut = min(cut, at)
    return text[:cut]


def _left_pad(batch: list[list[int]], pad_id: int):
    import torch

    width = max(len(p) for p in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask


def generate_batched(
    model,
    tokenizer,
    prompts: list[list[int]],
    gen_args: GeneratingArguments,
    stop_token_ids: list[int],
    batch_size: int = 8,
    stop_strings: Sequence[str] = (),
    amp: str | None = None,
) -> GenerationResult:
    """Generate a continuation for every tokenized prompt, ``batch_size`` prompts per generate() call.

    Prompts are sorted by length so each batch pads little, and results are put back in input order.
    The model is switched to eval mode for the call (its previous mode is restored afterwards).
    ``stop_strings`` are end-of-turn markers that are not single tokens (e.g. ``</s>`` for a tokenizer that lacks
    it): generation stops when one appears and the text is cut before it. ``amp``: the mixed precision the model
    was trained with ("bf16", "fp16" or None), see `generation_precision`.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
    pad_id = pad_token_id(tokenizer, stop_token_ids)
    config = build_generation_config(gen_args, stop_token_ids, pad_id)
    stop_strings = [s for s in stop_strings if s]
    extra: dict[str, Any] = {}
    if stop_strings:
        config.stop_strings = stop_strings
        extra["tokenizer"] = tokenizer  # generate() needs it to match strings across token boundaries
    device = model_device(model)

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    sequences: list[list[int]] = [[] for _ in prompts]
    new_tokens = 0
    seconds = 0.0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), generation_precision(model, amp):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                input_ids, attention_mask = _left_pad([list(prompts[i]) for i in idx], pad_id)
                t0 = time.perf_counter()
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    generation_config=config,
                    **extra,
                )
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - t0
                generated = out[:, input_ids.shape[1] :].tolist()
                for i, row in zip(idx, generated):
                    kept, stopped = cut_at_stop(row, stop_token_ids)
                    sequences[i] = kept
                    new_tokens += len(kept) + int(stopped)
    finally:
        model.train(was_training)

    texts = [_cut_text(tokenizer.decode(s, skip_special_tokens=True), stop_strings).strip() for s in sequences]
    return GenerationResult(sequences=sequences, texts=texts, new_tokens=new_tokens, seconds=seconds)


def write_predictions(
    path: str | os.PathLike, prompts: list[str], predicts: list[str], labels: list[str],
    extras: list[dict] | None = None,
) -> Path:
    """Write ``{"prompt", "predict", "label"}`` JSON lines (UTF-8, not ASCII-escaped), atomically; `extras`
    adds fields per row (``tool_calls``: the generated calls, parsed, where they parse).

    The file is written next to its destination and renamed into place, so a crash never leaves a truncated
    predictions file that looks complete.
    """
    if not (len(prompts) == len(predicts) == len(labels)):
        raise ValueError(
            f"write_predictions: {len(prompts)} prompts, {len(predicts)} predictions, {len(labels)} labels"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from sftlab.files import atomic_writer

    with atomic_writer(path) as f:
        for i, (prompt, predict, label) in enumerate(zip(prompts, predicts, labels)):
            row = {"prompt": prompt, "predict": predict, "label": label, **(extras[i] if extras else {})}
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")
    return path
