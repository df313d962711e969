"""sftlab.train.callbacks.LogCallback: tokens/s of training only, a progress bar on a terminal, lines otherwise."""

from __future__ import annotations

import io
import json
import time
from types import SimpleNamespace

import sftlab.train.callbacks as callbacks
from sftlab.train.callbacks import LogCallback


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(tmp_path, monkeypatch, stream):
    """Two training steps of 1 s and 500 tokens each, with an evaluation of 5 s between them."""
    clock = [1000.0]
    monkeypatch.setattr(callbacks, "time", SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic))
    counts = [0, 0]
    cb = LogCallback(lambda: tuple(counts), str(tmp_path), stream=stream)
    args = SimpleNamespace(world_size=1)
    state = SimpleNamespace(global_step=0, max_steps=4, epoch=0.0, is_world_process_zero=True)
    cb.on_train_begin(args, state, None)
    for step in (1, 2):
        clock[0] += 1.0
        counts[0] += 500
        counts[1] += 100
        state.global_step = step
        cb.on_step_end(args, state, None)
        cb.on_log(args, state, None, logs={"loss": 2.0 / step, "learning_rate": 1e-4})
        if step == 1:
            clock[0] += 5.0
            cb.on_log(args, state, None, logs={"eval_loss": 1.5})
            cb.on_evaluate(args, state, None)
    cb.on_train_end(args, state, None)
    return [json.loads(line) for line in (tmp_path / "trainer_log.jsonl").read_text().splitlines()]


def test_tokens_per_second_leave_out_evaluation(tmp_path, monkeypatch):
    records = _run(tmp_path, monkeypatch, io.StringIO())
    steps = [r for r in records if "loss" in r]
    assert [r["tokens_per_second"] for r in steps] == [500.0, 500.0]
    assert [r["trained_tokens_per_second"] for r in steps] == [100.0, 100.0]
    assert [r["eval_loss"] for r in records if "eval_loss" in r] == [1.5]


def test_log_lines_when_not_a_terminal(tmp_path, monkeypatch):
    out = io.StringIO()
    _run(tmp_path, monkeypatch, out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # step 1, the evaluation, step 2
    assert lines[0].startswith("[#####---------------] 1/4 loss 2.0000") and "tok/s 500" in lines[0]
    assert "eval_loss 1.5" in lines[1]


def test_progress_bar_on_a_terminal(tmp_path, monkeypatch):
    out = Terminal()
    _run(tmp_path, monkeypatch, out)
    text = out.getvalue()
    assert "2/4" in text and "loss 1.0000, 500 tok/s" in text  # tqdm's bar with the loss and rate
    assert "\r" in text  # redrawn in place
    assert "eval_loss 1.5" in text  # evaluation results as lines above the bar
