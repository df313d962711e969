"""sftlab.train.distributed without launching processes: what each rank holds, tied names, the CPU switch's
refusals. The sharded runs themselves are tested in tests/reliability/test_fsdp.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sftlab.errors import ConfigError
from sftlab.train.distributed import die_with_launcher, enable_fsdp_on_cpu, held_bytes, tied_duplicates


def _llama(tie: bool):
    from tests.helpers import tiny_llama_config
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(tiny_llama_config(100, tie_word_embeddings=tie))


def test_tied_head_is_the_only_duplicate():
    assert tied_duplicates(_llama(tie=True)) == ["lm_head.weight"]
    assert tied_duplicates(_llama(tie=False)) == []


def test_held_bytes_of_an_unsharded_model_are_its_parameters_and_adam_moments():
    model = _llama(tie=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = sum(p.numel() * 4 for p in model.parameters())
    assert held_bytes(model, opt) == (params, 0)  # AdamW makes its state at the first step
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    n_tensors = len(list(model.parameters()))
    assert held_bytes(model, opt) == (params, 2 * params + 4 * n_tensors)  # exp_avg, exp_avg_sq, fp32 step


def _trainer(distributed_type, plugin_args, mixed_precision="no"):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(distributed_type=getattr(DistributedType, distributed_type), fsdp_plugin=None,
                            mixed_precision=mixed_precision)
    return SimpleNamespace(accelerator=SimpleNamespace(state=state), args=SimpleNamespace(fsdp_plugin_args=plugin_args),
                           is_fsdp_enabled=False)


def test_cpu_switch_leaves_runs_without_fsdp_and_gpu_runs_alone(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert not enable_fsdp_on_cpu(_trainer("MULTI_CPU", None))
    assert not enable_fsdp_on_cpu(_trainer("MULTI_GPU", {"fsdp_version": 2}))


def test_cpu_switch_refuses_fsdp1():
    with pytest.raises(ConfigError, match="fsdp_version"):
        enable_fsdp_on_cpu(_trainer("MULTI_CPU", {"fsdp_version": 1}))


def test_no_parent_death_signal_outside_a_launcher(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert die_with_launcher() is False


def test_cpu_switch_turns_on_fsdp2_with_the_runs_precision(monkeypatch):
    """bf16 under FSDP2 is the sharding's MixedPrecisionPolicy (as accelerate sets it on GPUs); without it a --bf16
    run trained in fp32 (measured: the same weights as the fp32 run)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.MULTI_CPU)  # restored after
    trainer = _trainer("MULTI_CPU", {"fsdp_version": 2}, mixed_precision="bf16")
    assert enable_fsdp_on_cpu(trainer) and trainer.is_fsdp_enabled
    assert trainer.accelerator.state.distributed_type == DistributedType.FSDP
    assert PartialState._shared_state["distributed_type"] == DistributedType.FSDP
    assert trainer.accelerator.state.fsdp_plugin.mixed_precision_policy.param_dtype == torch.bfloat16
