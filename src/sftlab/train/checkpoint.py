"""Crash-safe checkpoints: a checkpoint is written into a staging directory and renamed to `checkpoint-N` only once
every file of every rank is on disk, so `checkpoint-N` is either complete or absent.

Hugging Face's Trainer writes straight into `checkpoint-N`; a kill or a full disk in the middle of a save leaves a
directory that looks like the newest checkpoint but cannot be resumed from. Here the staging name
(`tmp-checkpoint-N`) matches neither Trainer's `checkpoint-*` glob (rotation, `get_last_checkpoint`) nor sftlab's
`newest_checkpoint`, so resume never sees a half-written save; the previous checkpoint stays the newest one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil

from sftlab.errors import ConfigError, SftlabError

STAGING_PREFIX = "tmp-"


class CheckpointSaveError(SftlabError):
    """Saving a checkpoint failed (disk full, permissions, ...); the previous checkpoint is intact."""


def staging_dirs(run_dir: str) -> list[str]:
    """Leftover staging directories of interrupted saves in run_dir."""
    if not os.path.isdir(run_dir):
        return []
    return [os.path.join(run_dir, n) for n in os.listdir(run_dir)
            if n.startswith(f"{STAGING_PREFIX}checkpoint-") and os.path.isdir(os.path.join(run_dir, n))]


def _fsync_dir(path: str) -> None:
    """Make a rename durable (directory entries are only persisted when the directory itself is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _publish(staging: str, final: str) -> None:
    """Rename staging -> final. A directory cannot replace a non-empty one, so an existing final (the same step saved
    again, e.g. Ctrl-C right after a scheduled save) is moved aside first and removed afterwards."""
    old = None
    if os.path.exists(final):
        old = f"{staging}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    _fsync_dir(os.path.dirname(final))
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _barrier(trainer) -> None:
    if trainer.args.world_size > 1:
        trainer.accelerator.wait_for_everyone()


def newest_checkpoint(output_dir: str) -> str | None:
    """The newest checkpoint-N in output_dir that was completely written (has its trainer_state.json)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(r"checkpoint-(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(m.group(1)), path))
    return max(found)[1] if found else None


def find_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | bool | None, overwrite: bool) -> str | None:
    """Where training resumes: the checkpoint asked for (a directory, or true = the newest in output_dir); else,
    unless ``overwrite``, the newest complete checkpoint in output_dir, so rerunning a stopped command continues."""
    if resume_from_checkpoint:
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.lower() in ("true", "1", "yes"):
            ckpt = newest_checkpoint(output_dir)
            if ckpt is None:
                raise ConfigError(f"resume_from_checkpoint: no complete checkpoint in {output_dir}")
            return ckpt
        if not os.path.isdir(resume_from_checkpoint):
            raise ConfigError(f"resume_from_checkpoint: not a directory: {resume_from_checkpoint}")
        return resume_from_checkpoint
    return None if overwrite else newest_checkpoint(output_dir)


def save_checkpoint_atomically(trainer, model, trial) -> None:
    """Trainer._save_checkpoint, staged: every rank writes into tmp-checkpoint-N (model, optimizer, scheduler, scaler,
    its RNG state), the saving process(es) write trainer_state.json last, then rename it to checkpoint-N; rotation,
    best-model tracking and hub pushes then see only complete checkpoints."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

    args, state = trainer.args, trainer.state
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    run_dir = trainer._get_output_dir(trial=trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
    final = os.path.join(run_dir, name)
    staging = os.path.join(run_dir, STAGING_PREFIX + name)

    try:
        if args.should_save:
            for stale in staging_dirs(run_dir):  # debris of saves killed earlier
                shutil.rmtree(stale, ignore_errors=True)
            os.makedirs(staging, exist_ok=True)
        _barrier(trainer)  # the staging directory exists (and is empty) for every rank

        trainer.save_model(staging, _internal_call=True)
        if not args.save_only_model:
            trainer._save_optimizer_and_scheduler(staging)
            trainer._save_scaler(staging)
            trainer._save_rng_state(staging)
        tracker = getattr(trainer, "stream_tracker", None)
        if tracker is not None:  # every rank: where each of its stream shards continues (sftlab.data.streaming)
            tracker.save(staging, args.process_index)

        if state.best_global_step:
            # The best checkpoint is this one (about to be renamed) or an earlier, complete one.
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
            if state.best_global_step == state.global_step or os.path.isdir(best):
                state.best_model_checkpoint = best

        if args.should_save:
            if trainer.save_beside_checkpoint is not None:
                trainer.save_beside_checkpoint(staging)  # e.g. the template and config travel with every checkpoint
            _record_callback_states(trainer)
            # Written last: newest_checkpoint() treats a directory without it as incomplete.
            state.save_to_json(os.path.join(staging, "trainer_state.json"))
        _barrier(trainer)  # every rank's files are in staging
        if args.should_save:
            _publish(staging, final)
    except Exception as e:
        # torch.save and safetensors report a full disk as RuntimeError/SafetensorError, not OSError: look at the disk.
        full = _disk_full(e, run_dir)
        if args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # give the space back; the previous checkpoint is untouched
        if not (full or isinstance(e, OSError)):
            raise
        raise CheckpointSaveError(_save_error_message(e, full, final, newest_checkpoint(run_dir))) from e
    _barrier(trainer)  # checkpoint-N exists for everyone before anyone moves on (resume, best model, rotation)

    if args.push_to_hub:
        trainer._push_from_checkpoint(final)
    if args.should_save:
        rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                           best_model_checkpoint=state.best_model_checkpoint, use_mtime=True)


def _record_callback_states(trainer) -> None:
    """Store the state of stateful callbacks (early stopping, TrainerControl) in the trainer state, as Trainer does."""
    from transformers.trainer_callback import ExportableState

    for cb in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(cb, ExportableState):
            cb_name = cb.__class__.__name__
            if isinstance(trainer.state.stateful_callbacks.get(cb_name), list):
                trainer.state.stateful_callbacks[cb_name].append(cb.state())
            else:
                trainer.state.stateful_callbacks[cb_name] = cb.state()


def _disk_full(e: BaseException, path: str) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(e):
        return True
    try:
        return shutil.disk_usage(path).free < (1 << 20)
    except OSError:
        return False


def _save_error_message(e: BaseException, full: bool, final: str, previous: str | None) -> str:
    reason = "no space left on the disk" if full else (getattr(e, "strerror", None) or str(e))
    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    kept = (f"the previous checkpoint {previous} is intact; free space and rerun the same command to resume from it"
            if previous else "no earlier checkpoint exists; free space and rerun the same command")
    return f"saving {final} failed: {reason}{where}; {kept}"


def save_final_model(trainer) -> None:
    """trainer.save_model() into output_dir, with a full disk reported as a CheckpointSaveError naming what survives."""
    out = trainer.args.output_dir
    try:
        if getattr(trainer, "is_fsdp_enabled", False):
            from sftlab.train.distributed import save_full_model

            save_full_model(trainer, out)
        else:
            trainer.save_model()
    except Exception as e:
        full = _disk_full(e, out)
        if not (full or isinstance(e, OSError)):
            raise
        reason = "no space left on the disk" if full else (getattr(e, "strerror", None) or str(e))
        prev = newest_checkpoint(out)
        kept = f"; the checkpoint {prev} is intact" if prev else ""
        raise CheckpointSaveError(f"saving the final model to {out} failed: {reason}{kept}") from e
