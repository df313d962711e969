"""Best-fit-decreasing packing and pack layout, plus the collator's layout of packs."""

from __future__ import annotations

import random

import pytest
import torch

from sftlab.data.collator import SFTCollator, block_causal_mask
from sftlab.data.packing import bfd_pack, pack_examples


def _first_fit(lengths: list[int], capacity: int) -> int:
    """Number of bins first-fit uses in arrival order (the baseline BFD must not lose to)."""
    loads: list[int] = []
    for n in lengths:
        for b, load in enumerate(loads):
            if load + n <= capacity:
                loads[b] += n
                break
        else:
            loads.append(n)
    return len(loads)


def _reference_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Plain quadratic best-fit decreasing: tightest bin that fits, ties to the oldest bin."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        best = None
        for b, load in enumerate(loads):
            if load + lengths[i] <= capacity and (best is None or load > loads[best]):
                best = b
        if best is None:
            bins.append([i])
            loads.append(lengths[i])
        else:
            bins[best].append(i)
            loads[best] += lengths[i]
    return bins


@pytest.mark.parametrize("seed", range(40))
def test_bfd_random_cases(seed):
    rng = random.Random(seed)
    capacity = rng.choice([8, 16, 50, 128])
    lengths = [rng.randint(0 if seed % 5 == 0 else 1, capacity) for _ in range(rng.randint(1, 60))]
    bins = bfd_pack(lengths, capacity)

    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))  # every index exactly once
    loads = [sum(lengths[i] for i in b) for b in bins]
    assert all(load <= capacity for load in loads)
    assert len(bins) >= -(-sum(lengths) // capacity)
    assert len(bins) <= _first_fit(lengths, capacity)
    # Any-fit property: a new bin is only opened when nothing fits, so no two bins could be merged.
    for a in range(len(loads)):
        for b in range(a + 1, len(loads)):
            assert loads[a] + loads[b] > capacity
    assert bins == _reference_bfd(lengths, capacity)
    assert bfd_pack(list(lengths), capacity) == bins  # deterministic


def test_bfd_beats_first_fit_on_known_case():
    # First fit in arrival order needs 3 bins, sorted best fit 2.
    lengths = [3, 3, 7, 7]
    assert _first_fit(lengths, 10) == 3
    assert sorted(sorted(b) for b in bfd_pack(lengths, 10)) == [[0, 2], [1, 3]]


def test_bfd_rejects_bad_input():
    with pytest.raises(ValueError, match="length 11"):
        bfd_pack([3, 11], 10)
    with pytest.raises(ValueError):
        bfd_pack([1], 0)
    assert bfd_pack([], 4) == []


def test_pack_examples_layout():
    examples = [
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12]},
        {"input_ids": [20, 21, 22, 23, 24], "labels": [-100, -100, 22, 23, 24]},
        {"input_ids": [30, 31], "labels": [-100, 31]},
    ]
    packs = pack_examples(examples, capacity=8)
    assert packs == [
        {
            "input_ids": [20, 21, 22, 23, 24, 10, 11, 12],
            "labels": [-100, -100, 22, 23, 24, -100, 11, 12],
            "position_ids": [0, 1, 2, 3, 4, 0, 1, 2],
            "seq_lens": [5, 3],
        },
        {"input_ids": [30, 31], "labels": [-100, 31], "position_ids": [0, 1], "seq_lens": [2]},
    ]
    with pytest.raises(ValueError, match="labels"):
        pack_examples([{"input_ids": [1, 2], "labels": [1]}], 4)


def test_collator_packed_and_plain_layout():
    packs = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "seq_lens": [3, 2]},
        {"input_ids": [1, 2], "labels": [-100, 2], "seq_lens": [2]},
    ]
    b = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(packs)
    assert set(b) == {"input_ids", "labels", "shift_labels", "position_ids"}  # no mask: packing via positions
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, 8, 9, -100, -100, -100], [-100, 2] + [-100] * 6]
    # Targets never cross an example boundary (7 -> -100, not 7 -> 8 of the next example) nor padding.
    assert b["shift_labels"].tolist() == [[6, 7, -100, 9, -100, -100, -100, -100], [2] + [-100] * 7]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]

    plain = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1], "labels": [1]}]
    b = SFTCollator(pad_token_id=0)(plain)
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["shift_labels"].tolist() == [[6, 7, -100], [-100, -100, -100]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_collator_flatten_layout():
    packs = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lens": [3, 2]},
        {"input_ids": [1, 2], "labels": [1, 2], "seq_lens": [2]},
    ]
    b = SFTCollator(pad_token_id=0, pad_to_multiple_of=4, mask_mode="flatten")(packs)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 0]]
    assert b["shift_labels"].tolist() == [[6, 7, -100, 9, -100, 2, -100, -100]]  # not 9 -> 1
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 0]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 5, 7, 8] and b["cu_seq_lens_q"].dtype == torch.int32
    assert b["max_length_q"] == b["max_length_k"] == 3
    assert "attention_mask" not in b


def test_block_causal_mask_matches_definition():
    seg_lens = [[3, 2], [4]]
    mask = block_causal_mask(seg_lens, 6)
    assert mask.shape == (2, 1, 6, 6)
    for r, segs in enumerate(seg_lens):
        ids = [k for k, n in enumerate(segs) for _ in range(n)]
        ids += [len(segs)] * (6 - len(ids))  # padding: its own segment
        for i in range(6):
            for j in range(6):
                assert bool(mask[r, 0, i, j]) == (ids[i] == ids[j] and j <= i)


def test_collator_rejects_bad_mode():
    from sftlab.errors import ConfigError

    with pytest.raises(ConfigError, match="mask_mode"):
        SFTCollator(0, mask_mode="dense")
