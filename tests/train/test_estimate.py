"""The cost estimate's batches against sftlab's own collator, packing and splitting run on real examples, and its
parameter counts against the model training actually builds."""

from __future__ import annotations

import random

import pytest
import torch

from sftlab.data.collator import SFTCollator, pad_flat_batch, split_flat_batch
from sftlab.data.packing import pack_examples
from sftlab.train.estimate import estimate_memory, model_shape, plan_batches


def _examples(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(5, 300)
        trained = rng.randint(1, length)
        out.append({"input_ids": list(range(length)), "labels": [-100] * (length - trained) + [1] * trained})
    return out


def _plan(examples, **kw):
    args = dict(batch_size=3, grad_accum=2, epochs=1.0, max_steps=0, packing=False, cutoff_len=512,
                attn_implementation="sdpa", on_cpu=True, group_by_length=False, max_tokens_per_forward=400,
                pad_to_multiple_of=64, seed=42)
    args.update(kw)
    return plan_batches([len(e["input_ids"]) for e in examples],
                        [sum(l != -100 for l in e["labels"]) for e in examples], **args)


def _run_batches(rows: list[dict], order: list[int], batch: int, mode: str, budget: int | None, multiple: int):
    """What the collator, the trainer's split and the CPU padding make of the rows in this order."""
    collate = SFTCollator(pad_token_id=0, mask_mode=mode)
    computed, pieces_seen, largest = 0, 0, 0
    for start in range(0, len(order), batch):
        b = collate([rows[i] for i in order[start:start + batch]])
        pieces = split_flat_batch(b, budget) if (mode == "flatten" and budget) else [b]
        for p in pieces:
            if mode == "flatten" and multiple:
                p = pad_flat_batch(p, multiple)
            n = p["input_ids"].numel()
            computed += n
            largest = max(largest, n)
            pieces_seen += 1
    return computed, pieces_seen, largest


def _shuffled(n: int, seed: int = 42) -> list[int]:
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


def test_padding_free_batches_match_the_collator():
    ex = _examples(50)
    plan = _plan(ex)
    computed, passes, largest = _run_batches(ex, _shuffled(50), 3, "flatten", 400, 64)
    assert (plan.computed_tokens_per_epoch, plan.forward_passes_per_epoch, plan.largest_forward_tokens) == (
        computed, passes, largest)
    assert plan.tokens_per_epoch == sum(len(e["input_ids"]) for e in ex)
    assert plan.batches_per_epoch == 17 and plan.steps_per_epoch == 9 and plan.optimizer_steps == 9


def test_padded_rows_grouped_by_length_match_the_collator():
    from transformers.trainer_pt_utils import LengthGroupedSampler

    ex = _examples(50, seed=1)
    plan = _plan(ex, attn_implementation="eager", group_by_length=True, epochs=2.5)
    g = torch.Generator()
    g.manual_seed(42)
    order = list(LengthGroupedSampler(6, lengths=[len(e["input_ids"]) for e in ex], generator=g))
    computed, passes, largest = _run_batches(ex, order, 3, "auto", None, 0)
    assert (plan.computed_tokens_per_epoch, plan.forward_passes_per_epoch, plan.largest_forward_tokens) == (
        computed, passes, largest)
    assert 0 < plan.padding_share < 1 and plan.optimizer_steps == 23  # ceil(2.5 * 9)


def test_packed_rows_match_packing_and_the_collator():
    ex = _examples(40, seed=2)
    plan = _plan(ex, packing=True)
    packs = pack_examples(ex, 512)
    computed, passes, largest = _run_batches(packs, _shuffled(len(packs)), 3, "flatten", 400, 64)
    assert plan.rows == len(packs)
    assert (plan.computed_tokens_per_epoch, plan.forward_passes_per_epoch, plan.largest_forward_tokens) == (
        computed, passes, largest)


def test_max_steps_wins():
    assert _plan(_examples(10), max_steps=7).optimizer_steps == 7


@pytest.mark.parametrize("ft", ["lora", "full", "freeze"])
def test_parameter_counts_are_those_of_the_model_training_builds(tiny_model_dir, ft):
    from sftlab.config import parse_config
    from sftlab.models.load import count_parameters, load_model

    cfg = parse_config(["--model_name_or_path", tiny_model_dir, "--finetuning_type", ft, "--freeze_trainable_layers",
                        "1", "--bf16", "false"])
    shape = model_shape(cfg)
    model, _ = load_model(cfg.model, cfg.finetuning, for_training=True)
    trainable, total = count_parameters(model)
    assert (shape.trainable, shape.params) == (trainable, total)
    plan = _plan(_examples(8))
    mem = estimate_memory(shape, plan, finetuning_type=ft, bf16=False, on_cpu=True, optim="adamw_torch",
                          loss_chunk_size=1024, process_bytes=0)
    assert mem.weights == 4 * total and mem.gradients == 4 * trainable and mem.optimizer == 8 * trainable
    lora_bf16 = estimate_memory(shape, plan, finetuning_type=ft, bf16=True, on_cpu=True, optim="adamw_torch",
                                loss_chunk_size=1024, process_bytes=0)
    frozen = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear
                 and not m.weight.requires_grad and m is not model.get_output_embeddings())
    assert lora_bf16.weights == 4 * total - (2 * frozen if ft == "lora" else 0)
