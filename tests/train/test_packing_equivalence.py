"""Packing and batching must not change the SFT objective.

Reference: every example run alone through the model (no padding, no packing) with the naive full-logits
cross-entropy. Packed batches (several examples per row, 2 rows, sdpa and eager, every collator mask mode)
must give the same per-example losses and the same gradients; and the sum-over-tokens normalisation must give
the same step loss and gradient for any split of 8 examples into micro-batches x accumulation steps.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.collator import SFTCollator
from sftlab.data.packing import bfd_pack, pack_examples
from sftlab.train.loss import compute_sft_loss
from tests.helpers import tiny_llama_config

VOCAB = 300
LENGTHS = [12, 9, 10, 7, 4, 5, 3, 8]
CAPACITY = 30
RTOL = 1e-4


def _examples() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(1, n - 1, (1,), generator=g))
        if len(out) in (3, 7):
            prompt = 0  # fully trained examples that are not first in their pack: catches targets that leak
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _model(attn: str):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    # A wide init makes the output depend strongly on context, so any leak across examples shows up.
    config = tiny_llama_config(VOCAB, attn_implementation=attn, initializer_range=0.2)
    return LlamaForCausalLM(config).float().train()


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def _assert_grads_close(a: dict, b: dict):
    """rtol with an absolute floor of rtol x the largest entry (fp32 summation-order noise near zero)."""
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=RTOL, atol=RTOL * float(b[name].abs().max()), msg=name)


@functools.cache
def _reference(attn: str) -> tuple[list[float], list[int], dict[str, torch.Tensor]]:
    """Per-example summed CE, trained-token counts, and the gradient of the summed CE over all examples."""
    model = _model(attn)
    losses, counts = [], []
    for ex in _examples():
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        loss.backward()  # gradients accumulate over examples = gradient of the total
        losses.append(loss.item())
        counts.append(int((labels[0, 1:] != -100).sum()))
    return losses, counts, _grads(model)


def _example_ids(bins: list[list[int]], batch: dict, flatten: bool) -> torch.Tensor:
    """Which example each position of the collated batch belongs to (-1 for padding)."""
    rows = []
    for b in bins:
        rows.append([i for i in b for _ in range(LENGTHS[i])])
    if flatten:
        rows = [[i for r in rows for i in r]]
    width = batch["input_ids"].shape[1]
    return torch.tensor([r + [-1] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["auto", "4d", "flatten"])
def test_packed_batch_equals_examples_one_by_one(attn, mode):
    ref_losses, _, ref_grads = _reference(attn)
    model, examples = _model(attn), _examples()
    bins = bfd_pack(LENGTHS, CAPACITY)
    assert len(bins) == 2 and all(len(b) >= 3 for b in bins)  # several examples per row, 2 rows
    packs = pack_examples(examples, CAPACITY)
    batch = SFTCollator(pad_token_id=0, mask_mode=mode)(packs)
    if mode != "flatten":
        assert batch["input_ids"].shape == (2, CAPACITY)
        assert (batch["input_ids"] == 0).any()  # one row is padded

    parts = compute_sft_loss(model, batch, chunk_size=5)
    parts.loss_sum.backward()
    _assert_grads_close(_grads(model), ref_grads)
    torch.testing.assert_close(parts.loss_sum.item(), sum(ref_losses), rtol=RTOL, atol=0)

    owner = _example_ids(bins, batch, flatten=mode == "flatten")
    with torch.no_grad():
        for k, ref in enumerate(ref_losses):
            only_k = dict(batch, shift_labels=batch["shift_labels"].masked_fill(owner != k, -100))
            got = compute_sft_loss(model, only_k).loss_sum.item()
            assert got == pytest.approx(ref, rel=RTOL), f"example {k}"


def test_packing_without_restarting_positions_would_differ():
    """Sanity check that the equivalence test can fail: positions that do not restart let examples see
    each other (and shift their rotary positions), which changes the losses."""
    ref_losses, _, _ = _reference("sdpa")
    batch = SFTCollator(pad_token_id=0)(pack_examples(_examples(), CAPACITY))
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        got = compute_sft_loss(_model("sdpa"), batch).loss_sum.item()
    assert abs(got - sum(ref_losses)) > 1e-2 * sum(ref_losses)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("micro,accum", [(8, 1), (2, 4), (1, 8)])
def test_step_loss_independent_of_batching(packed, micro, accum):
    ref_losses, ref_counts, ref_grads = _reference("sdpa")
    n_total = sum(ref_counts)
    ref_loss = sum(ref_losses) / n_total

    model, examples = _model("sdpa"), _examples()
    collate = SFTCollator(pad_token_id=0, pad_to_multiple_of=4)
    groups = [examples[s : s + micro] for s in range(0, len(examples), micro)]
    assert len(groups) == accum
    batches = [collate(pack_examples(g, CAPACITY) if packed else g) for g in groups]
    # What HF Trainer does for num_items_in_batch: count trained shift_labels over the whole step.
    num_items = sum(int(b["shift_labels"].ne(-100).sum()) for b in batches)
    assert num_items == n_total

    step_loss = 0.0
    for b in batches:
        loss = compute_sft_loss(model, b, chunk_size=7).loss_sum / num_items
        loss.backward()
        step_loss += loss.item()
    assert step_loss == pytest.approx(ref_loss, rel=RTOL)
    _assert_grads_close(_grads(model), {k: v / n_total for k, v in ref_grads.items()})
