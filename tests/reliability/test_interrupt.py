"""Interruptions other than a kill: Ctrl-C (SIGINT) through the real entry point, a crash in the middle of writing a
checkpoint, and a disk that fills up while saving. Each must leave a resumable run whose completion equals an
uninterrupted run."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import (
    MAX_STEPS, SAVE_STEPS, max_abs_diff, run_inprocess, spawn, step_losses, train_argv, weights,
)


def test_ctrl_c_saves_stops_and_rerun_finishes(tmp_path, model_dir, data_file, cache_dir, reference, capsys):
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_file, str(out), cache_dir)
    proc = spawn(argv)
    log = out / "trainer_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().count("\n") >= 2):  # two steps done: mid-run, before any save
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no training progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "Ctrl-C: stopping after this step and saving a checkpoint" in output
    stopped = json.loads((out / "trainer_state.json").read_text())["global_step"]
    assert 2 <= stopped < MAX_STEPS
    with capsys.disabled():
        print(f"\nCtrl-C after 2 logged steps: stopped at step {stopped}")
    assert f"stopped at step {stopped}; resume with the same command" in output
    ckpt = out / f"checkpoint-{stopped}"
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == stopped
    assert (ckpt / "optimizer.pt").is_file() and (ckpt / "scheduler.pt").is_file()

    assert run_inprocess(argv) == 0
    assert f"resuming from {ckpt}" in capsys.readouterr().out
    ref = reference("full")
    assert max_abs_diff(weights(out), weights(ref)) == 0.0
    assert step_losses(out) == step_losses(ref)


class _Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way up handles it."""


def test_crash_while_saving_leaves_previous_checkpoint_newest(tmp_path, model_dir, data_file, cache_dir, reference,
                                                              capsys, monkeypatch):
    from sftlab.train.trainer import SFTTrainer
    from sftlab.train.checkpoint import newest_checkpoint

    out = tmp_path / "run"
    argv = train_argv(model_dir, data_file, str(out), cache_dir)
    real = SFTTrainer._save_rng_state

    def dies_on_second_save(self, output_dir):
        if self.state.global_step == 2 * SAVE_STEPS:  # model, optimizer and scheduler already written
            raise _Killed()
        return real(self, output_dir)

    monkeypatch.setattr(SFTTrainer, "_save_rng_state", dies_on_second_save)
    with pytest.raises(_Killed):
        run_inprocess(argv)
    monkeypatch.setattr(SFTTrainer, "_save_rng_state", real)

    staging = out / f"tmp-checkpoint-{2 * SAVE_STEPS}"
    assert (staging / "optimizer.pt").is_file(), "the save was under way"
    assert not (out / f"checkpoint-{2 * SAVE_STEPS}").exists(), "a half-written checkpoint must not get its name"
    assert newest_checkpoint(str(out)) == str(out / f"checkpoint-{SAVE_STEPS}")

    capsys.readouterr()
    assert run_inprocess(argv) == 0
    assert f"resuming from {out / f'checkpoint-{SAVE_STEPS}'}" in capsys.readouterr().out
    assert not staging.exists()
    assert max_abs_diff(weights(out), weights(reference("full"))) == 0.0


@pytest.fixture()
def small_disk(tmp_path):
    """A 24 MiB tmpfs (root can mount one), so the disk really fills up; None where mounting is not allowed."""
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


class _FillDiskAfterFirstSave:
    """After the first checkpoint, fill the disk with a ballast file (leaving ~64 KiB) so the next save fails."""

    def __init__(self, disk: Path | None):
        self.disk, self.saves = disk, 0

    def on_save(self, args, state, control, **kw):
        self.saves += 1
        if self.saves == 1 and self.disk is not None:
            with open(self.disk / "ballast", "wb") as fh:
                chunk = b"\0" * (1 << 16)
                try:
                    while os.statvfs(self.disk).f_bavail * os.statvfs(self.disk).f_frsize > (1 << 16):
                        fh.write(chunk)
                        fh.flush()
                except OSError:
                    pass

    def __getattr__(self, name):  # every other TrainerCallback event: nothing to do
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def test_disk_full_while_saving(tmp_path, small_disk, model_dir, data_file, cache_dir, reference, capsys,
                                monkeypatch):
    import errno

    import sftlab.workflow as workflow
    from sftlab.train.trainer import SFTTrainer

    out = (small_disk or tmp_path) / "run"
    argv = train_argv(model_dir, data_file, str(out), cache_dir)
    filler = _FillDiskAfterFirstSave(small_disk)
    monkeypatch.setattr(workflow, "run_sft", functools.partial(workflow.run_sft, callbacks=[filler]))
    if small_disk is None:  # no tmpfs: make the second save fail the way a full disk does
        real = SFTTrainer._save_optimizer_and_scheduler

        def enospc(self, output_dir):
            if self.state.global_step == 2 * SAVE_STEPS:
                raise OSError(errno.ENOSPC, "No space left on device", os.path.join(output_dir, "optimizer.pt"))
            return real(self, output_dir)

        monkeypatch.setattr(SFTTrainer, "_save_optimizer_and_scheduler", enospc)

    assert run_inprocess(argv) == 2  # the CLI's exit code for a problem the user can fix
    err = capsys.readouterr().err
    with capsys.disabled():
        print(f"\n[{'tmpfs' if small_disk else 'injected ENOSPC'}] {err.strip()}")
    assert f"saving {out / f'checkpoint-{2 * SAVE_STEPS}'} failed: no space left on the disk" in err
    assert f"the previous checkpoint {out / f'checkpoint-{SAVE_STEPS}'} is intact" in err
    assert "Traceback" not in err
    assert not (out / f"tmp-checkpoint-{2 * SAVE_STEPS}").exists(), "the partial save is removed to free space"
    assert not (out / f"checkpoint-{2 * SAVE_STEPS}").exists()

    # Free space and rerun the same command: it resumes from the intact checkpoint and finishes exactly.
    monkeypatch.undo()
    if small_disk is not None:
        (small_disk / "ballast").unlink()
    assert run_inprocess(argv) == 0
    assert f"resuming from {out / f'checkpoint-{SAVE_STEPS}'}" in capsys.readouterr().out
    assert max_abs_diff(weights(out), weights(reference("full"))) == 0.0
