"""sftlab.data.collator: batches checked against the examples they were made from, element by element."""

from __future__ import annotations

import pytest
import torch

from sftlab.data.collator import SFTCollator, block_causal_mask, mask_mode_for_attention, pad_flat_batch
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import ConfigError

EXAMPLES = [
    {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
    {"input_ids": [8, 9, 10, 11, 12], "labels": [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12]},
    {"input_ids": [13, 14], "labels": [IGNORE_INDEX, 14]},
]


def _next_token_targets(example: dict) -> list[int]:
    """Each position's target: the next token's label, none after the last token (written out by hand)."""
    return [example["labels"][i + 1] for i in range(len(example["labels"]) - 1)] + [IGNORE_INDEX]


def test_padded_rows_keep_each_example_and_pad_after_it():
    b = SFTCollator(pad_token_id=0)(EXAMPLES)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0, 0], [8, 9, 10, 11, 12], [13, 14, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    for row, ex in zip(b["shift_labels"].tolist(), EXAMPLES):
        n = len(ex["input_ids"])
        assert row[:n] == _next_token_targets(ex) and row[n:] == [IGNORE_INDEX] * (5 - n)
    assert (b["labels"] != IGNORE_INDEX).sum() == sum(l != IGNORE_INDEX for ex in EXAMPLES for l in ex["labels"])


def test_flatten_makes_one_row_with_example_boundaries():
    b = SFTCollator(pad_token_id=0, mask_mode="flatten")(EXAMPLES)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]]
    assert b["cu_seq_lens_q"].tolist() == [0, 3, 8, 10] == b["cu_seq_lens_k"].tolist()
    assert b["max_length_q"] == b["max_length_k"] == 5
    assert b["shift_labels"].tolist() == [sum((_next_token_targets(ex) for ex in EXAMPLES), [])]
    assert "attention_mask" not in b  # varlen kernels take the boundaries, not a mask


def test_4d_mask_lets_tokens_see_only_their_own_example_and_the_past():
    mask = block_causal_mask([[2, 1]], 4)[0, 0]
    expected = [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]  # the padding token is its own segment
    assert mask.int().tolist() == expected


def test_pad_to_multiple_rounds_the_width_up():
    b = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)(EXAMPLES)
    assert b["input_ids"].shape == (3, 8)
    flat = SFTCollator(pad_token_id=0, pad_to_multiple_of=4, mask_mode="flatten")(EXAMPLES)
    assert flat["input_ids"].shape == (1, 12) and flat["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 12]


def test_pad_flat_batch_appends_one_unlabelled_segment():
    batch = SFTCollator(0, mask_mode="flatten")(EXAMPLES)  # 10 tokens
    padded = pad_flat_batch(batch, 8, pad_token_id=7)
    assert padded["input_ids"].shape == (1, 16)
    assert padded["input_ids"][0, 10:].tolist() == [7] * 6
    assert torch.equal(padded["input_ids"][:, :10], batch["input_ids"])
    assert padded["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5]
    assert padded["labels"][0, 10:].tolist() == [IGNORE_INDEX] * 6
    assert padded["shift_labels"][0, 10:].tolist() == [IGNORE_INDEX] * 6
    assert padded["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 16] == padded["cu_seq_lens_k"].tolist()
    assert padded["max_length_q"] == padded["max_length_k"] == 6
    assert pad_flat_batch(padded, 8) is padded  # already a multiple
    assert pad_flat_batch(batch, 0) is batch and pad_flat_batch(batch, 1) is batch


def test_mask_mode_follows_the_attention_kernel():
    assert mask_mode_for_attention("sdpa") == "auto" and mask_mode_for_attention("eager") == "auto"
    assert mask_mode_for_attention("flash_attention_2") == "flatten"
    assert mask_mode_for_attention("sftlab_varlen") == "flatten"


def test_bad_input_is_refused():
    with pytest.raises(ConfigError, match="mask_mode must be one of"):
        SFTCollator(0, mask_mode="dense")
    with pytest.raises(ValueError, match="input_ids has 2 tokens but labels has 1"):
        SFTCollator(0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="seq_lens"):
        SFTCollator(0)([{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "seq_lens": [1, 1]}])
