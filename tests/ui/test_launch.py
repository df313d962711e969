"""A launched run is a separate `python -m sftlab train` process in its own session; its end is recorded; one run
at a time; a run started from the command line resumes from its saved config."""

from __future__ import annotations

import json
import os
import time

import pytest

from sftlab.ui import launch, runs
from tests.ui.conftest import SRC, write_finished_run


def test_launch_detaches_records_the_exit_and_the_failure(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", SRC)  # the launched `python -m sftlab` imports this checkout
    run = tmp_path / "saves" / "bad"
    pid = launch.launch(tmp_path, run, ["--train_file", "missing.jsonl", "--output_dir", "saves/bad"])
    assert os.getsid(pid) == pid != os.getsid(0)  # its own session: the app's terminal and signals do not reach it
    lock = run / runs.LOCK_FILE
    deadline = time.time() + 240
    while json.loads(lock.read_text()).get("returncode") is None and time.time() < deadline:
        time.sleep(0.5)
    assert json.loads(lock.read_text())["returncode"] == 2
    assert "train_file: file not found: missing.jsonl" in (run / runs.PROCESS_LOG).read_text()
    assert runs.summarize(tmp_path, run)["state"] == "failed"
    assert json.loads(lock.read_text())["argv"] == ["--train_file", "missing.jsonl", "--output_dir", "saves/bad"]
    with pytest.raises(launch.LaunchRefused, match="not running"):
        launch.stop(run)


def test_one_run_at_a_time(tmp_path):
    running = tmp_path / "saves" / "cli-run"
    running.mkdir(parents=True)
    (running / "trainer_log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')  # a command-line run, logging now
    with pytest.raises(launch.LaunchRefused, match="saves/cli-run is still running: one run at a time"):
        launch.launch(tmp_path, tmp_path / "saves" / "new", ["--train_file", "x"])
    assert not (tmp_path / "saves" / "new").exists()


def test_resume_of_a_command_line_run_uses_its_saved_config(tmp_path):
    run = tmp_path / "saves" / "a"
    write_finished_run(run, "m", "d.jsonl", 1e-4, [1.0])
    assert launch.resume_args(run, tmp_path) == ["saves/a/sftlab_config.yaml", "--output_dir", "saves/a"]
    (run / runs.LOCK_FILE).write_text(json.dumps({"pid": 1, "argv": ["--x", "1"]}))
    assert launch.resume_args(run, tmp_path) == ["--x", "1"]
