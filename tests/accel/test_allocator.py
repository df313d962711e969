"""sftlab.accel.allocator: weights copied out of the checkpoint's file mapping, bit for bit, and the mapping gone."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from sftlab.accel.allocator import _file_mapped_ranges, own_file_backed_tensors
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


_FRESH_HEAP = """
import ctypes, json
import torch
import sftlab.accel.allocator as allocator

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
off = allocator.prefault_heap(1 << 20)
on = allocator.retain_freed_memory()
free_before = libc.mallinfo2().fordblks
touched = allocator.prefault_heap(100 << 20)
print(json.dumps([off, on, touched, libc.mallinfo2().fordblks - free_before]))
"""


def test_prefaulted_heap_memory_stays_in_the_process():
    """What prefault_heap touches is freed into glibc's heap and kept there for the first step to reuse; without
    retain_freed_memory in effect it does nothing (large blocks would go straight back to the system). In a
    fresh process, so the heap has no free memory of its own yet."""
    import json
    import subprocess

    done = subprocess.run([sys.executable, "-c", _FRESH_HEAP], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    off, on, touched, kept = json.loads(done.stdout.strip().splitlines()[-1])
    assert off == 0
    if not on:
        pytest.skip("not glibc")
    assert touched == 128 << 20  # whole 64 MiB blocks
    assert kept >= touched - (1 << 20)


def test_trainer_prefaults_once_from_the_first_pass_and_the_model_size(tmp_path, monkeypatch):
    """accel's batch hook touches (tokens of the first pass, cut to the token budget by the trainer) x layers x
    hidden x PREFAULT_BYTES_PER_UNIT bytes, once, before the first training pass."""
    import sftlab.accel.allocator as allocator
    from tests.train.test_fast_paths import _features, _model
    from transformers import TrainingArguments

    from sftlab.data.collator import SFTCollator
    from sftlab.accel.attention import VARLEN_ATTENTION, register_varlen_attention
    from sftlab.accel.setup import BatchHook
    from sftlab.train.trainer import CountingCollator, SFTTrainer
    from sftlab.data.splits import ListDataset

    calls = []
    monkeypatch.setattr(allocator, "prefault_heap", lambda n: calls.append(n) or 0)
    register_varlen_attention()
    feats = _features()
    model = _model(VARLEN_ATTENTION)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(feats), max_steps=2,
                             use_cpu=True, report_to="none", remove_unused_columns=False, save_strategy="no",
                             disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ListDataset(feats),
                         data_collator=CountingCollator(SFTCollator(0, mask_mode="flatten")),
                         max_tokens_per_forward=12, batch_hook=BatchHook(model))
    passes = []
    model.model.register_forward_pre_hook(lambda m, a, kw: passes.append(kw["input_ids"].shape[1]), with_kwargs=True)
    trainer.train()
    config = model.config
    assert len(passes) > 2  # several passes per step (whole examples: one longer than the budget is a pass)
    assert calls == [passes[0] * config.num_hidden_layers * config.hidden_size * allocator.PREFAULT_BYTES_PER_UNIT]
