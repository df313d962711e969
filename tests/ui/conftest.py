"""A workspace with a tiny model and data, and the app started as users start it (`python -m sftlab ui`)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path: Path, n: int, start: int = 0) -> None:
    rows = [{"instruction": f"Add {i} and {i + 1}.", "output": f"The sum is {2 * i + 1}."}
            for i in range(start, start + n)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def write_finished_run(run: Path, model: str, train_file: str, learning_rate: float, losses: list[float]) -> None:
    """A finished run as `sftlab train` leaves it on disk (config, log, results, state), written directly."""
    from sftlab.config import parse_config, save_config

    run.mkdir(parents=True, exist_ok=True)
    cfg = parse_config(["--model_name_or_path", model, "--train_file", train_file, "--output_dir", str(run),
                        "--learning_rate", str(learning_rate), "--max_steps", str(len(losses)), "--bf16", "false"])
    save_config(cfg, str(run / "sftlab_config.yaml"))
    with open(run / "trainer_log.jsonl", "w") as fh:
        for step, loss in enumerate(losses, start=1):
            fh.write(json.dumps({"step": step, "loss": loss, "learning_rate": learning_rate, "tokens_per_second": 100.0,
                                 "elapsed": step, "remaining": len(losses) - step}) + "\n")
    (run / "train_results.json").write_text(json.dumps({"train_loss": sum(losses) / len(losses)}))
    (run / "trainer_state.json").write_text(json.dumps({"global_step": len(losses), "max_steps": len(losses)}))


@pytest.fixture(scope="module")
def ui_workspace(tmp_path_factory):
    from sftlab.models.bundled import bundled_tokenizer_dir
    from tests.helpers import make_tiny_model_dir

    ws = tmp_path_factory.mktemp("ws")
    make_tiny_model_dir(ws / "models" / "tiny", str(bundled_tokenizer_dir()))
    write_rows(ws / "data" / "train.jsonl", 24)
    write_rows(ws / "data" / "test.jsonl", 3, start=100)
    write_finished_run(ws / "saves" / "baseline", "models/tiny", "data/train.jsonl", 5e-4, [10.9, 10.8, 10.6, 10.5])
    return ws


@contextmanager
def running_app(workspace: Path, *extra: str):
    """`python -m sftlab ui` on a free port; yields (base URL, the printed URL); the app is stopped after."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "sftlab", "ui", "--workspace", str(workspace), "--port", str(port),
                             *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    printed = ""
    try:
        deadline = time.time() + 180  # a loaded 2-core machine was seen to take over 60 s
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "open http" in line:
                printed = line.split("open ", 1)[1].strip()
                break
        assert printed, f"the app did not start (exit code {proc.poll()})"
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # uvicorn binds right after printing
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield base, printed
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
