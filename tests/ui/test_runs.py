"""Run state and contents read from disk: each state built as the files a run leaves, scores against
sftlab.eval.metrics, the compare table."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from sftlab.eval.metrics import text_metrics
from sftlab.ui import runs
from tests.ui.conftest import write_finished_run


def _lock(run, **kw):
    (run / runs.LOCK_FILE).write_text(json.dumps({"pid": 1, "argv": ["x"], **kw}))


def _log(run, steps):
    run.mkdir(parents=True, exist_ok=True)
    (run / "trainer_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "remaining": 9.0}) + "\n"
                                                   for s in steps))


def _checkpoint(run, step, max_steps=10):
    c = run / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))


def _state(ws, run):
    return runs.summarize(ws, run)["state"]


def test_finished_run(tmp_path):
    run = tmp_path / "saves" / "a"
    write_finished_run(run, "m", "d.jsonl", 1e-4, [3.0, 2.0])
    s = runs.summarize(tmp_path, run)
    assert (s["state"], s["step"], s["max_steps"], s["last_loss"], s["eta_seconds"]) == ("finished", 2, 2, 2.0, None)
    assert s["model"] == "m" and s["data"] == "d.jsonl" and s["finetuning_type"] == "lora"


def test_stopped_before_the_last_step_is_interrupted(tmp_path):
    """A graceful stop ends normally (train_results.json written) before max_steps: interrupted, not finished."""
    run = tmp_path / "r"
    write_finished_run(run, "m", "d.jsonl", 1e-4, [3.0, 2.0])
    (run / "trainer_state.json").write_text(json.dumps({"global_step": 2, "max_steps": 10}))
    _checkpoint(run, 2)
    _lock(run, returncode=0)
    assert _state(tmp_path, run) == "interrupted"


def test_killed_with_a_checkpoint_is_interrupted_without_one_failed(tmp_path):
    run = tmp_path / "r"
    _log(run, [1, 2, 3])
    _lock(run, returncode=-9)
    old = time.time() - 3600
    import os

    os.utime(run / "trainer_log.jsonl", (old, old))
    assert _state(tmp_path, run) == "failed"
    _checkpoint(run, 2)
    assert _state(tmp_path, run) == "interrupted"
    _lock(run, returncode=1)  # an error exit is a failure even with a checkpoint to resume from
    assert _state(tmp_path, run) == "failed"


def test_running_from_a_live_process_or_a_fresh_log(tmp_path):
    run = tmp_path / "r"
    _log(run, [1])
    assert _state(tmp_path, run) == "running"  # started from the command line: the log is fresh
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "sftlab"])
    try:
        _lock(run, pid=proc.pid, returncode=None)
        assert _state(tmp_path, run) == "running"
    finally:
        proc.kill()
        proc.wait()
    assert not runs.process_alive(proc.pid)
    _lock(run, pid=proc.pid, returncode=None)  # the app was restarted: the pid is gone, nothing to resume
    assert _state(tmp_path, run) == "failed"


def test_a_reused_pid_is_not_a_run(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert not runs.process_alive(proc.pid)  # alive, but not an sftlab command line
    finally:
        proc.kill()
        proc.wait()


def test_find_runs_skips_checkpoints_hidden_dirs_and_symlinks(tmp_path):
    write_finished_run(tmp_path / "saves" / "a", "m", "d", 1e-4, [1.0])
    _checkpoint(tmp_path / "saves" / "a", 1)
    _log(tmp_path / ".sftlab-ui" / "x", [1])
    other = tmp_path.parent / (tmp_path.name + "-other")
    _log(other / "b", [1])
    (tmp_path / "link").symlink_to(other)
    assert [p.relative_to(tmp_path).as_posix() for p in runs.find_runs(tmp_path)] == ["saves/a"]


def test_curves_and_smoothing(tmp_path):
    from sftlab.outputs import _smooth

    run = tmp_path / "r"
    _log(run, [1, 2, 3, 4])
    with open(run / "trainer_log.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 4, "eval_loss": 0.5}) + "\n" + '{"step": 5, "lo')  # a line being written
    d = runs.detail(tmp_path, run)
    assert [p["loss"] for p in d["train"]] == [1.0, 0.5, 1 / 3, 0.25]
    assert [p["smoothed"] for p in d["train"]] == _smooth([1.0, 0.5, 1 / 3, 0.25])
    assert d["eval"] == [{"step": 4, "eval_loss": 0.5}]


def test_predictions_scored_per_row_worst_first(tmp_path):
    rows = [("p1", "the cat sat", "the cat sat"), ("p2", "a dog", "the cat sat"), ("p3", "cat sat", "the cat sat")]
    path = tmp_path / "generated_predictions.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "predict": x, "label": y}) + "\n" for p, x, y in rows))
    scored = runs.scored_predictions(path)
    assert [r["row"] for r in scored] == [2, 3, 1]
    for r in scored:
        expect = text_metrics([r["predict"]], [r["label"]])
        assert r["f1"] == round(expect["f1"], 2) and r["rouge-l"] == round(expect["rouge-l"], 2)
    assert scored[-1]["exact_match"] == 100.0


def test_e2e_predictions_are_read(tmp_path):
    path = tmp_path / "e2e_predictions.jsonl"
    path.write_text(json.dumps({"question": "q", "generated_answer": "x", "gold_answer": "x"}) + "\n")
    assert runs.scored_predictions(path)[0]["f1"] == 100.0


def test_compare_marks_differences(tmp_path):
    write_finished_run(tmp_path / "a", "m", "d.jsonl", 1e-4, [3.0, 2.0])
    write_finished_run(tmp_path / "b", "m", "d.jsonl", 2e-4, [3.0, 1.0])
    out = runs.compare(tmp_path, [tmp_path / "a", tmp_path / "b"])
    rows = {r["key"]: r for r in out["table"]}
    assert rows["training.learning_rate"]["differs"] and rows["training.learning_rate"]["values"] == [1e-4, 2e-4]
    assert rows["metric.train_loss"]["differs"]
    assert not rows["model.model_name_or_path"]["differs"]
    assert out["table"][0]["key"].startswith("metric.")
