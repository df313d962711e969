"""What a run directory says about itself, read from disk only, so runs started from the command line show too.

State: `running` (a live process: the launcher's lock file names it, or the training log grew in the last minute),
`finished` (train_results.json and every planned step done), `interrupted` (stopped before the last step, with a
checkpoint to resume from), `failed` (the process ended with an error, or left nothing to resume from).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import yaml

from sftlab.outputs import _smooth, read_log

LOCK_FILE = "sftlab_ui_run.json"  # written by sftlab.ui.launch: pid, argv, start time, return code when known
PROCESS_LOG = "sftlab_ui_run.log"  # the launched process's stdout and stderr
PREDICTION_FILES = ("generated_predictions.jsonl", "e2e_predictions.jsonl", "eval_predictions.jsonl")
RESULT_FILES = ("all_results.json", "train_results.json", "eval_results.json", "predict_results.json",
                "e2e_eval_results.json")
CLI_RUN_FRESH_SECONDS = 60.0  # a run without a lock file counts as running while its log is this fresh
_SKIP_DIRS = {"node_modules", "__pycache__", "rqa_context", "predict"}
_MAX_DEPTH = 4


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run_dir(path: Path) -> bool:
    return any((path / n).is_file() for n in ("trainer_log.jsonl", "sftlab_config.yaml", LOCK_FILE))


def find_runs(workspace: Path) -> list[Path]:
    """Every run directory under the workspace (symlinks not followed, hidden and checkpoint dirs skipped)."""
    found = []
    root_depth = len(workspace.parts)
    for dirpath, dirnames, _ in os.walk(workspace, followlinks=False):
        here = Path(dirpath)
        if here != workspace and is_run_dir(here):
            found.append(here)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "checkpoint-", "tmp-checkpoint-"))
                             and d not in _SKIP_DIRS and len(here.parts) - root_depth < _MAX_DEPTH)
    return found


_CACHE: dict[Path, tuple[tuple[int, int], Any]] = {}


def _cached(path: Path, parse, missing):
    """parse() of the file at `path`, parsed again only when the file changed (the runs list is polled every
    second, and a config's YAML takes ~0.1 s to parse)."""
    try:
        st = path.stat()
    except OSError:
        return missing
    key = (st.st_mtime_ns, st.st_size)
    hit = _CACHE.get(path)
    if hit is None or hit[0] != key:
        hit = _CACHE[path] = (key, parse())
    return hit[1]


def _parse_config(path: Path) -> dict[str, dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=loader) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def read_config(run: Path) -> dict[str, dict]:
    path = run / "sftlab_config.yaml"
    return _cached(path, lambda: _parse_config(path), {})


def read_lock(run: Path) -> dict:
    return _read_json(run / LOCK_FILE) or {}


def process_alive(pid: int | None) -> bool:
    """True for a live (not zombie) process whose command line is an sftlab one (a reused pid is not ours)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X") and b"sftlab" in cmdline


def checkpoints(run: Path) -> list[dict]:
    """Complete checkpoints (trainer_state.json written last), oldest first, with their step."""
    out = []
    for p in run.iterdir() if run.is_dir() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file():
            out.append({"name": p.name, "step": int(m.group(1))})
    return sorted(out, key=lambda c: c["step"])


def planned_steps(run: Path, config: dict, ckpts: list[dict]) -> int | None:
    """max_steps as the Trainer computed it (from a trainer_state.json), else the configured max_steps."""
    states = [run / "trainer_state.json"] + [run / c["name"] / "trainer_state.json" for c in reversed(ckpts)]
    for s in states:
        data = _read_json(s)
        if data and data.get("max_steps"):
            return int(data["max_steps"])
    configured = (config.get("training") or {}).get("max_steps")
    return int(configured) if isinstance(configured, int) and configured > 0 else None


def run_state(run: Path, log: list[dict], ckpts: list[dict], max_steps: int | None, now: float | None = None) -> str:
    lock = read_lock(run)
    rc = lock.get("returncode")
    if lock.get("pid") and rc is None and process_alive(lock.get("pid")):
        return "running"
    finished_training = (run / "train_results.json").is_file()
    log_path = run / "trainer_log.jsonl"
    if not lock and not finished_training and log_path.is_file():
        if (now or time.time()) - log_path.stat().st_mtime < CLI_RUN_FRESH_SECONDS:
            return "running"
    if rc not in (None, 0, 130, -2):
        return "interrupted" if ckpts and rc in (-9, 137, -15, 143) else "failed"
    step = max((r.get("step", 0) for r in log), default=0)
    if finished_training:
        state = _read_json(run / "trainer_state.json") or {}
        step = state.get("global_step", step)
        if max_steps and step < max_steps:
            return "interrupted"
        return "finished"
    return "interrupted" if ckpts else "failed"


def train_points(log: list[dict]) -> list[dict]:
    rows = [r for r in log if r.get("loss") is not None]
    smooth = _smooth([float(r["loss"]) for r in rows]) if rows else []
    return [{"step": r["step"], "loss": r["loss"], "smoothed": s, "learning_rate": r.get("learning_rate"),
             "tokens_per_second": r.get("tokens_per_second"), "grad_norm": r.get("grad_norm")}
            for r, s in zip(rows, smooth)]


def eval_points(log: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(("eval_", "e2e_"))}
            for r in log if r.get("eval_loss") is not None or any(k.startswith("e2e_") for k in r)]


def _safe_log(run: Path) -> list[dict]:
    return _cached(run / "trainer_log.jsonl", lambda: _parse_log(run), [])


def _parse_log(run: Path) -> list[dict]:
    try:
        return read_log(run)
    except ValueError:  # a line being written right now: read the complete ones
        out = []
        for line in (run / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def summarize(workspace: Path, run: Path) -> dict[str, Any]:
    """One row of the runs list."""
    config = read_config(run)
    log = _safe_log(run)
    ckpts = checkpoints(run)
    max_steps = planned_steps(run, config, ckpts)
    state = run_state(run, log, ckpts, max_steps)
    train = [r for r in log if r.get("loss") is not None]
    last = train[-1] if train else {}
    data = config.get("data") or {}
    step = max((r.get("step", 0) for r in log), default=0)
    return {
        "name": run.relative_to(workspace).as_posix(),
        "state": state,
        "model": (config.get("model") or {}).get("model_name_or_path"),
        "data": ", ".join(data.get("train_file") or []) or None,
        "finetuning_type": (config.get("finetuning") or {}).get("finetuning_type"),
        "step": step,
        "max_steps": max_steps,
        "last_loss": last.get("loss"),
        "tokens_per_second": last.get("tokens_per_second"),
        "eta_seconds": last.get("remaining") if state == "running" else None,
        "checkpoints": [c["name"] for c in ckpts],
        "updated": max((p.stat().st_mtime for p in run.iterdir() if p.is_file()), default=0.0),
    }


def list_runs(workspace: Path) -> list[dict[str, Any]]:
    rows = [summarize(workspace, r) for r in find_runs(workspace)]
    return sorted(rows, key=lambda r: r["updated"], reverse=True)


def tail(path: Path, lines: int = 80) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        fh.seek(max(0, fh.tell() - 64 * 1024))
        text = fh.read().decode("utf-8", errors="replace")
    text = text.replace("\r", "\n")
    return "\n".join([l for l in text.splitlines() if l.strip()][-lines:])


def metrics(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in RESULT_FILES:
        data = _read_json(run / name)
        if data:
            out.update({k: v for k, v in data.items() if isinstance(v, (int, float, str))})
    return out


def detail(workspace: Path, run: Path) -> dict[str, Any]:
    """Everything the run page shows."""
    log = _safe_log(run)
    card = run / "README.md"
    out = summarize(workspace, run)
    out.update(
        config=read_config(run),
        train=train_points(log),
        eval=eval_points(log),
        metrics=metrics(run),
        model_card=card.read_text(encoding="utf-8") if card.is_file() else "",
        log_tail=tail(run / PROCESS_LOG) or "\n".join(json.dumps(r) for r in log[-30:]),
        predictions=[n for n in PREDICTION_FILES if (run / n).is_file()],
        argv=read_lock(run).get("argv"),
    )
    return out


def _pair(row: dict) -> tuple[str, str, str]:
    """(prompt, prediction, reference) of a predictions row (sftlab predict or rqa end-to-end)."""
    prompt = row.get("prompt", row.get("question", ""))
    pred = row.get("predict", row.get("generated_answer", ""))
    ref = row.get("label", row.get("gold_answer", ""))
    return str(prompt), str(pred), str(ref)


def scored_predictions(path: Path, limit: int = 2000) -> list[dict[str, Any]]:
    """The predictions file's rows with per-row scores from sftlab.eval.metrics, worst (lowest F1) first."""
    from sftlab.eval.metrics import text_metrics

    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if i >= limit:
                break
            if not line.strip():
                continue
            prompt, pred, ref = _pair(json.loads(line))
            scores = text_metrics([pred], [ref])
            rows.append({"row": i + 1, "prompt": prompt, "predict": pred, "label": ref,
                         **{k: round(v, 2) for k, v in scores.items()}})
    return sorted(rows, key=lambda r: (r["f1"], r["rouge-l"], r["row"]))


def compare(workspace: Path, runs: list[Path]) -> dict[str, Any]:
    """Curves of every run, and one table of metrics and hyperparameters with the differing rows marked."""
    details = [detail(workspace, r) for r in runs]
    table: dict[str, list[Any]] = {}
    for k, d in enumerate(details):
        flat = {f"metric.{n}": v for n, v in d["metrics"].items()}
        for group, values in d["config"].items():
            for n, v in (values or {}).items():
                flat[f"{group}.{n}"] = v if isinstance(v, (int, float, str, bool, type(None))) else json.dumps(v)
        for key, v in flat.items():
            table.setdefault(key, [None] * len(details))[k] = v
    rows = [{"key": k, "values": v, "differs": len({json.dumps(x) for x in v}) > 1} for k, v in sorted(table.items())]
    rows.sort(key=lambda r: (not r["key"].startswith("metric."), not r["differs"], r["key"]))
    return {"runs": [{"name": d["name"], "state": d["state"], "train": d["train"], "eval": d["eval"]}
                     for d in details], "table": rows}
