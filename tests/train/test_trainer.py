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
