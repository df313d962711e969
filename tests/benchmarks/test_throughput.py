"""benchmarks/throughput.py counts tokens the same way for every library: these check its counter on the batch
layouts the libraries feed (TRL's padded 0/1 masks, padding-free batches, LLaMA-Factory's neat packing as segment
numbers and as the 4-D block-diagonal mask it builds for sdpa), against counts made by hand, and that the
LLaMA-Factory configuration it writes is the one the benchmark claims to run."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("throughput", REPO / "benchmarks" / "throughput.py")
throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(throughput)

# One packed row of 7 positions: example 1 (2 tokens), example 2 (3 tokens), 2 padding positions.
SEGMENTS = torch.tensor([[1, 1, 2, 2, 2, 0, 0]])
POSITIONS = torch.tensor([[0, 1, 0, 1, 2, 0, 0]])
LABELS = torch.tensor([[-100, 5, -100, -100, 8, -100, -100]])  # trained after the shift: 5 and 8


def block_diagonal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Additive (batch, 1, L, L) mask, written out position by position: i sees j when both belong to the same
    example and j <= i; padding sees nothing."""
    b, n = segments.shape
    mask = torch.full((b, 1, n, n), torch.finfo(torch.float32).min)
    for r in range(b):
        for i in range(n):
            for j in range(i + 1):
                if segments[r, i] != 0 and segments[r, i] == segments[r, j]:
                    mask[r, 0, i, j] = 0.0
    return mask


def count(batch: dict) -> tuple[int, int, int]:
    counter = throughput.CountingWrapper(lambda features: batch)
    counter([])
    return counter.tokens, counter.trained, counter.examples


def test_neat_packing_is_counted_like_its_segments_in_either_mask_form():
    as_segments = dict(input_ids=torch.ones_like(SEGMENTS), attention_mask=SEGMENTS, position_ids=POSITIONS,
                       labels=LABELS)
    as_4d = dict(as_segments, attention_mask=block_diagonal_mask(SEGMENTS))
    assert count(as_segments) == (5, 2, 2)
    assert count(as_4d) == (5, 2, 2)


def test_padded_and_padding_free_batches():
    padded = dict(input_ids=torch.ones(2, 4, dtype=torch.long),
                  attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
                  labels=torch.tensor([[-100, 3, 4, -100], [-100, -100, 6, 7]]))
    assert count(padded) == (7, 4, 2)
    padding_free = dict(input_ids=torch.ones(1, 5, dtype=torch.long), position_ids=torch.tensor([[0, 1, 2, 0, 1]]),
                        labels=torch.tensor([[-100, -100, 9, -100, 4]]))
    assert count(padding_free) == (5, 2, 2)


def test_llamafactory_runs_its_fastest_setup_with_the_benchmark_settings(tmp_path):
    a = SimpleNamespace(max_length=512, workdir=str(tmp_path), packed_batch=3, steps=12)
    for name, bf16 in (("llamafactory_fastest", True), ("llamafactory_fp32", False)):
        cfg = throughput.llamafactory_config(name, "lora", a, "/models/smollm2", tmp_path / "data")
        assert cfg["bf16"] is bf16 and cfg["neat_packing"] and cfg["packing"]
        assert (cfg["lora_rank"], cfg["lora_alpha"], cfg["lora_dropout"], cfg["lora_target"]) == (16, 32, 0.0, "all")
        assert (cfg["per_device_train_batch_size"], cfg["max_steps"], cfg["cutoff_len"]) == (3, 12, 512)
        assert cfg["learning_rate"] == throughput.LR["lora"] and cfg["lr_scheduler_type"] == "cosine"
        assert cfg["disable_gradient_checkpointing"] and cfg["template"] == "smollm2"
