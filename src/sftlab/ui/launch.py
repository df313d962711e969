"""A run is a separate `python -m sftlab train ...` process, started from an argument list (never a shell), in its
own session so that closing the browser or restarting the app never signals it. Its lock file records the pid and
argv (for Stop and Resume) and, when this app saw the process end, its return code.

Stop sends SIGINT to the run's process group, exactly what Ctrl-C in a terminal does: the Trainer's GracefulStop
callback finishes the step, saves a checkpoint and ends the run. Resume starts the same argv again; `sftlab train`
continues from the newest complete checkpoint in the output directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from sftlab.errors import SftlabError
from sftlab.outputs import write_json
from sftlab.ui.runs import LOCK_FILE, PROCESS_LOG, list_runs, process_alive, read_lock


class LaunchRefused(SftlabError):
    """Another run is still running (one run at a time unless --max_parallel_runs says otherwise), or no such run."""


def train_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sftlab", "train", *args]


def running_runs(workspace: Path) -> list[str]:
    return [r["name"] for r in list_runs(workspace) if r["state"] == "running"]


def busy_message(busy: list[str]) -> str:
    return (f"{busy[0]} is still running: one run at a time on this machine (stop it first, or start the app "
            f"with --max_parallel_runs N)")


def _wait_and_record(proc: subprocess.Popen, lock_path: Path) -> None:
    rc = proc.wait()
    lock = json.loads(lock_path.read_text(encoding="utf-8")) if lock_path.is_file() else {}
    if lock.get("pid") == proc.pid:
        lock.update(returncode=rc, ended=time.time())
        write_json(lock_path, lock)


def launch(workspace: Path, run_dir: Path, args: list[str], max_parallel: int = 1) -> int:
    """Start `sftlab train args` with cwd=workspace, detached; returns the pid."""
    busy = running_runs(workspace)
    if len(busy) >= max_parallel:
        raise LaunchRefused(busy_message(busy))
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = train_argv(args)
    log = open(run_dir / PROCESS_LOG, "ab")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=workspace, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, env=env, close_fds=True)
    log.close()
    lock_path = run_dir / LOCK_FILE
    write_json(lock_path, {"pid": proc.pid, "argv": args, "started": time.time(), "returncode": None})
    threading.Thread(target=_wait_and_record, args=(proc, lock_path), daemon=True).start()
    return proc.pid


def stop(run_dir: Path) -> int:
    """Ask the run to stop gracefully (SIGINT to its process group, as Ctrl-C); returns the pid signalled."""
    pid = read_lock(run_dir).get("pid")
    if not process_alive(pid):
        raise LaunchRefused(f"{run_dir.name} is not running (no live process started by this app)")
    os.killpg(os.getpgid(pid), signal.SIGINT)
    return pid


def resume_args(run_dir: Path, workspace: Path) -> list[str]:
    """The argv the run was launched with; for a run started elsewhere, its saved config into the same dir."""
    argv = read_lock(run_dir).get("argv")
    if argv:
        return list(argv)
    config = run_dir / "sftlab_config.yaml"
    if not config.is_file():
        raise LaunchRefused(f"{run_dir.name}: no sftlab_config.yaml to resume from")
    rel = run_dir.relative_to(workspace).as_posix()
    return [config.relative_to(workspace).as_posix(), "--output_dir", rel]


def resume(workspace: Path, run_dir: Path, max_parallel: int = 1) -> int:
    return launch(workspace, run_dir, resume_args(run_dir, workspace), max_parallel)
