"""Sharded training (FSDP2) with the Trainer's own switches, on GPUs and on CPU ranks.

Users turn FSDP on as for any Trainer: ``--fsdp full_shard --fsdp_config FILE`` (``fsdp_version: 2``) or an
accelerate config with ``distributed_type: FSDP``. accelerate then shards the model with ``fully_shard`` (one unit
per decoder layer, the embedding / final norm / LM head as one more, the rest at the root), wraps the optimizer
around the shards and saves checkpoints as distributed checkpoints (``pytorch_model_fsdp_0/``, ``optimizer_0/``,
one file per rank, written through ``torch.distributed.checkpoint``).

accelerate only turns FSDP on for GPU-type backends: on CPU ranks (gloo) its state stays ``MULTI_CPU`` and the run
silently trains as DDP. FSDP2 itself runs on CPU, so ``enable_fsdp_on_cpu`` moves that state to FSDP right after
the Trainer creates its Accelerator, before anything is prepared; everything after that is accelerate's and the
Trainer's ordinary FSDP2 code path. The final model of a sharded run is gathered and saved as an ordinary
transformers / peft directory (``save_full_model``).
"""

from __future__ import annotations

import os
import sys

from transformers import TrainerCallback

from sftlab.errors import ConfigError


def fsdp_requested(args) -> bool:
    """FSDP asked for by TrainingArguments (``--fsdp`` / ``--fsdp_config``) or by ``accelerate launch``."""
    return bool(getattr(args, "fsdp_plugin_args", None)) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def enable_fsdp_on_cpu(trainer) -> bool:
    """Switch accelerate's state from DDP to FSDP2 on CPU ranks when FSDP was requested; True if it did."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU or not fsdp_requested(trainer.args):
        return False
    plugin_args = trainer.args.fsdp_plugin_args
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("fsdp_config: on CPU ranks only FSDP2 runs; set \"fsdp_version\": 2 in --fsdp_config "
                          "(or fsdp_version: 2 in the accelerate config)")
    # AcceleratorState copies PartialState's fields whenever it is instantiated again (accelerate does so inside
    # many helpers), so the type is changed in both shared states.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    if state.mixed_precision != "no":
        # As accelerate does when it turns FSDP on itself: under FSDP2 the precision is the sharding's
        # MixedPrecisionPolicy (bf16 compute weights), not an autocast around the forward.
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return True


def save_full_model(trainer, output_dir: str) -> None:
    """The whole model (or adapter) of a sharded run as an ordinary transformers / peft directory: every rank
    takes part in gathering the full state dict, the saving process writes it."""
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    for name in tied_duplicates(trainer.model):
        state_dict.pop(name, None)
    if trainer.args.should_save:
        trainer._save(output_dir, state_dict=state_dict)
    trainer.accelerator.wait_for_everyone()


def tied_duplicates(model) -> list[str]:
    """Names of parameters that are another parameter under a second name (a tied LM head), all but the first.

    The gathered state dict holds separate copies, so transformers cannot see the tie by storage when saving."""
    first: dict[int, str] = {}
    extra = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            extra.append(name)
        else:
            first[id(param)] = name
    return extra


def local_bytes(tensor) -> int:
    """Bytes this rank stores for ``tensor`` (its shard, for a DTensor)."""
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def held_bytes(model, optimizer) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) held by this rank."""
    import torch

    params = sum(local_bytes(p) for p in model.parameters())
    state = 0
    if optimizer is not None:
        for per_param in optimizer.state.values():
            state += sum(local_bytes(v) for v in per_param.values() if isinstance(v, torch.Tensor))
    return params, state


class ShardReport(TrainerCallback):
    """After the first optimizer step (when AdamW's state exists), every rank prints what it holds:
    ``[sftlab] rank R holds P bytes of parameters and S bytes of optimizer state``."""

    def __init__(self, trainer_ref):
        self.trainer_ref = trainer_ref
        self.done = False

    def on_step_end(self, args, state, control, **kw):
        if self.done:
            return
        self.done = True
        trainer = self.trainer_ref()
        params, opt_state = held_bytes(trainer.model, trainer.optimizer)
        rank = int(os.environ.get("RANK", "0"))
        # One write per line: the ranks share the launcher's stdout, and print() writes the newline separately.
        sys.stdout.write(f"[sftlab] rank {rank} holds {params} bytes of parameters and {opt_state} bytes of "
                         f"optimizer state\n")
        sys.stdout.flush()


def die_with_launcher() -> bool:
    """Under a launcher (torchrun, accelerate launch), make this worker die when the launcher dies (Linux).

    torchrun starts its workers in sessions of their own: SIGKILL of the launcher (an OOM kill, a scheduler's hard
    stop) would leave them training, and a rerun of the same command would then share the output directory with
    them. With the parent-death signal they end with it; the rerun resumes from the newest complete checkpoint."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher was already gone before the signal was set
        os.kill(os.getpid(), signal.SIGKILL)
    return True


def init_deepspeed_comm(args) -> bool:
    """With ``--deepspeed`` on CPU ranks, start DeepSpeed's communication layer before the model is loaded.

    ZeRO-3 partitions the weights while ``from_pretrained`` builds the model (``zero.Init``), which reads the world
    size from DeepSpeed's own layer. accelerate starts that layer only for GPU-type backends; on CPU ranks it
    started later (in ``deepspeed.initialize``), so ``zero.Init`` saw one process and refused the batch sizes.
    Reuses the process group the Trainer's arguments already made."""
    if not getattr(args, "deepspeed", None) or args.world_size <= 1:
        return False
    from deepspeed import comm

    if comm.is_initialized():
        return False
    comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    return True
