"""sftlab.train.allocator: weights copied out of the checkpoint's file mapping, bit for bit, and the mapping gone."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from sftlab.train.allocator import _file_mapped_ranges, own_file_backed_tensors
from tests.helpers import tiny_llama_config

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def _mapped(path) -> bool:
    with open("/proc/self/maps") as f:
        return any(line.rstrip().endswith(str(path)) for line in f)


def _file_backed(model) -> int:
    ranges = _file_mapped_ranges()
    return sum(any(lo <= p.data_ptr() < hi for lo, hi in ranges) for p in model.parameters())


def test_weights_leave_the_file_mapping_unchanged(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(300)).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    weights = tmp_path / "model.safetensors"
    if not _file_backed(model):
        pytest.skip("this transformers copies weights at load: nothing is file-backed")
    assert _mapped(weights)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    n = own_file_backed_tensors(model)
    gc.collect()
    assert n == len(before) and _file_backed(model) == 0
    assert not _mapped(weights)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    assert own_file_backed_tensors(model) == 0
