"""SFTTrainer's group_by_length sampler: built from the lengths the examples store, the same order as the one
transformers builds by reading every example."""

from __future__ import annotations

import numpy as np
import torch


class StoredLengths:
    """Examples that know their lengths (as sftlab.data.store's do) and count how often they are read."""

    def __init__(self, lengths):
        self._lengths = np.asarray(lengths)
        self.reads = 0

    def __len__(self):
        return len(self._lengths)

    def __getitem__(self, i):
        self.reads += 1
        return {"input_ids": [1] * int(self._lengths[i]), "labels": [1] * int(self._lengths[i])}

    def lengths(self):
        return self._lengths


def test_group_by_length_uses_stored_lengths(tmp_path, smol_tokenizer_dir):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from sftlab.config import make_training_args
    from sftlab.data.splits import ListDataset
    from sftlab.train.trainer import SFTTrainer

    model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=1, num_attention_heads=2))
    args = make_training_args({"output_dir": str(tmp_path), "train_sampling_strategy": "group_by_length",
                               "per_device_train_batch_size": 4, "report_to": "none"})
    lengths = np.random.default_rng(0).integers(1, 500, size=300)
    data = StoredLengths(lengths)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ListDataset(data))
    torch.manual_seed(7)
    got = list(trainer._get_train_sampler())
    assert data.reads == 0
    torch.manual_seed(7)
    want = list(LengthGroupedSampler(4, dataset=[data[i] for i in range(len(data))]))
    assert got == want and sorted(got) == list(range(300))


def _features():
    """Three samples; the second a pack of two examples."""
    return [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11, 12, 13], "labels": [-100, 10, 11, -100, 13], "seq_lens": [3, 2]},
        {"input_ids": [14, 15, 16], "labels": [-100, 15, 16]},
    ]


def test_without_samples_leaves_only_the_kept_samples_trained_tokens():
    """Masking sample 1 of a batch trains exactly the targets of samples 0 and 2 collated on their own, in the
    padded layout and in the one-row (flatten) layout."""
    from sftlab.data.collator import SFTCollator
    from sftlab.train.trainer import CountingCollator, samples_in_batch, without_samples

    feats = _features()
    keep = torch.tensor([True, False, True])
    for mode in ("auto", "flatten"):
        collate = CountingCollator(SFTCollator(pad_token_id=0, mask_mode=mode, pad_to_multiple_of=8))
        batch = collate(feats)
        assert samples_in_batch(batch) == 3
        masked = without_samples(batch, keep)
        alone = collate([feats[0], feats[2]])
        for key in ("labels", "shift_labels"):
            got = masked[key][masked[key] != -100].tolist()
            assert got == alone[key][alone[key] != -100].tolist() and got, (mode, key)
        assert torch.equal(masked["input_ids"], batch["input_ids"])  # the forward pass itself is unchanged
        assert without_samples(batch, torch.ones(3, dtype=torch.bool)) is batch


def test_samples_in_batch_refuses_a_flat_batch_it_cannot_split():
    import pytest

    from sftlab.data.collator import SFTCollator
    from sftlab.train.trainer import samples_in_batch

    with pytest.raises(RuntimeError, match="CountingCollator"):
        samples_in_batch(SFTCollator(pad_token_id=0, mask_mode="flatten")(_features()))
