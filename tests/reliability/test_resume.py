"""Exact resume through the real entry point: `python -m sftlab train ...` is SIGKILLed after a checkpoint exists,
the same command is run again, and the result must equal an uninterrupted run bit for bit (weights and every
logged loss): data order, RNG state (LoRA dropout), optimizer and scheduler all restored."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path


from tests.reliability.conftest import (
    MAX_STEPS, SAVE_STEPS, log_records, max_abs_diff, run_inprocess, spawn, step_losses, train_argv, weights,
)


def _kill_after_first_checkpoint(argv: list[str], out: Path, step: int = SAVE_STEPS) -> None:
    """Start the run, wait until checkpoint-`step` is complete, SIGKILL the process while it is still training."""
    proc = spawn(argv)
    ckpt = out / f"checkpoint-{step}" / "trainer_state.json"
    deadline = time.monotonic() + 300  # a safety net against a hung child, not a performance assertion
    while not ckpt.is_file():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before its first checkpoint:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no checkpoint appeared")
        time.sleep(0.02)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert alive and proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    final = [n for n in ("model.safetensors", "adapter_model.safetensors") if (out / n).exists()]
    assert not final, "the killed run must not have reached its final save"


def _newest(out: Path) -> int:
    return max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / "trainer_state.json").is_file())


def _check_resumed_equals_reference(out: Path, ref: str, capsys, resumed_from: int) -> None:
    assert f"resuming from {out / f'checkpoint-{resumed_from}'}" in capsys.readouterr().out
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == MAX_STEPS
    diff = max_abs_diff(weights(out), weights(ref))
    print(f"max |w_resumed - w_reference| = {diff:.3g}")
    assert diff == 0.0
    # The log of the resumed run holds every step once (the killed run's records past its checkpoint are dropped)
    # with the losses of the uninterrupted run.
    steps = [r["step"] for r in log_records(out) if "loss" in r]
    assert steps == list(range(1, MAX_STEPS + 1))
    assert step_losses(out) == step_losses(ref)


def test_sigkill_then_rerun_resumes_exactly_full(tmp_path, model_dir, data_file, cache_dir, reference, capsys):
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_file, str(out), cache_dir, finetuning_type="full")
    _kill_after_first_checkpoint(argv, out)
    newest = _newest(out)
    assert newest < MAX_STEPS

    # What a crash in the middle of a save by another writer leaves: a later checkpoint-N without trainer_state.json
    # and with a truncated weights file, and a staging directory of sftlab's own. Resume must skip both.
    partial = out / f"checkpoint-{newest + SAVE_STEPS}"
    partial.mkdir()
    data = (out / f"checkpoint-{newest}" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(data[: len(data) // 2])
    stale = out / f"tmp-checkpoint-{newest + 1}"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"\0" * 100)

    assert run_inprocess(argv) == 0  # the same command again
    _check_resumed_equals_reference(out, reference("full"), capsys, resumed_from=newest)
    # The partial directory was replaced by a complete checkpoint when its step was saved again; staging is gone.
    assert (partial / "trainer_state.json").is_file()
    assert not stale.exists()


def test_sigkill_then_rerun_resumes_exactly_lora(tmp_path, model_dir, data_file, cache_dir, reference, capsys):
    out = tmp_path / "run"
    argv = train_argv(model_dir, data_file, str(out), cache_dir, finetuning_type="lora")
    _kill_after_first_checkpoint(argv, out)
    newest = _newest(out)
    assert run_inprocess(argv) == 0
    _check_resumed_equals_reference(out, reference("lora"), capsys, resumed_from=newest)
    assert (out / "adapter_config.json").is_file()
