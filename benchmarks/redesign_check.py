"""The redesign's effect on training speed: sftlab's default configuration now against the code of an earlier commit.

Both run benchmarks/throughput.py's ``sftlab`` configuration (LoRA, unpacked, the bundled SmolLM2-135M-Instruct) on
the same generated data with the same settings, each in its own subprocess with its own tree's `src` first on
PYTHONPATH (the earlier tree is extracted with `git archive` into a temporary folder, its own throughput.py runs
it). The runs alternate (old, new, then new, old, ...) so that a change in the machine's load hits both sides;
only the ratio new / old of trained tokens per second means anything on a shared machine.

    python benchmarks/redesign_check.py                      # 311fd6c (before the redesign), 2 rounds, 1 thread
    python benchmarks/redesign_check.py --old 311fd6c --rounds 3 --rows 48

Results go to benchmarks/results/redesign_check.{json,md}.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))

import throughput  # noqa: E402  (this tree's data generator and packed-batch rule)


def extract(rev: str, into: Path) -> Path:
    """The tree of `rev` (src and benchmarks) in `into`, via git archive: no worktree left behind."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", rev, "src", "benchmarks"],
                             capture_output=True, check=True).stdout
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def imported_from(tree: Path) -> str:
    """Where `import sftlab` resolves with this tree's src first (checked, so neither side runs the other's code)."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    out = subprocess.run([sys.executable, "-c", "import sftlab; print(sftlab.__file__)"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    if not out.startswith(str(tree / "src")):
        raise SystemExit(f"[redesign] {tree}: sftlab imports from {out}, not from this tree")
    return out


def run_side(tree: Path, workdir: Path, a, packed: int) -> dict:
    """One `sftlab:<mode>` run of `tree`'s throughput.py; its RESULT line."""
    cmd = [sys.executable, str(tree / "benchmarks" / "throughput.py"), "--one", f"sftlab:{a.mode}",
           "--workdir", str(workdir), "--rows", str(a.rows), "--steps", str(a.steps), "--batch", str(a.batch),
           "--max-length", str(a.max_length), "--threads", str(a.threads), "--packed-batch", str(packed)]
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tree))
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"[redesign] {tree} failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


def table(runs: list[dict], old: str) -> str:
    lines = ["| round | side | trained tok/s | non-pad tok/s | peak RSS GiB | train loss (last 25%) | load |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['round']} | {r['side']} | {r['trained'] / r['runtime']:.0f} "
                     f"| {r['tokens'] / r['runtime']:.0f} | {r['peak_rss_gib']:.2f} | {r['final_train_loss']:.4f} "
                     f"| {r['load_before']:.1f} |")
    ratios = round_ratios(runs)
    lines += ["", f"new / {old} trained tok/s per round: " + ", ".join(f"{x:.2f}x" for x in ratios)
              + f"; median {statistics.median(ratios):.2f}x"]
    return "\n".join(lines)


def round_ratios(runs: list[dict]) -> list[float]:
    out = []
    for n in sorted({r["round"] for r in runs}):
        side = {r["side"]: r["trained"] / r["runtime"] for r in runs if r["round"] == n}
        out.append(side["new"] / side["old"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", default="311fd6c", help="the commit to compare with (default: before the redesign)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--mode", default="lora", choices=("lora", "full"))
    # One thread by default: on a shared, oversubscribed machine OpenMP threads wait on each other for whole time
    # slices (a 2-thread step was measured 50x slower than on a quiet machine), which no alternation evens out.
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "redesign_check"))
    a = p.parse_args()

    from transformers import AutoTokenizer

    from sftlab.models.bundled import bundled_model_dir

    tmp = Path(tempfile.mkdtemp(prefix="sftlab-redesign-"))
    try:
        trees = {"old": extract(a.old, tmp / "old"), "new": ROOT}
        for side, tree in trees.items():
            print(f"[redesign] {side}: sftlab from {imported_from(tree)}", flush=True)
        data = tmp / "data"
        data.mkdir()
        train, _ = throughput.write_data(data, a.rows, 8, a.max_length)
        packed = throughput.packed_batch(train, AutoTokenizer.from_pretrained(str(bundled_model_dir())),
                                         a.max_length, a.steps)
        workdirs = {}
        for side in trees:  # each side its own data cache and outputs, on the same data
            workdirs[side] = tmp / f"work-{side}"
            shutil.copytree(data, workdirs[side])
        runs = []
        for n in range(1, a.rounds + 1):
            for side in (("old", "new") if n % 2 else ("new", "old")):
                t0 = time.time()
                r = run_side(trees[side], workdirs[side], a, packed)
                r.update(round=n, side=side)
                runs.append(r)
                print(f"[redesign] round {n} {side}: {r['trained'] / r['runtime']:.0f} trained tok/s "
                      f"({time.time() - t0:.0f} s, load {r['load_before']:.1f})", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    md = (f"sftlab's default configuration ({a.mode}, unpacked) now against commit {a.old}: "
          f"{platform.processor() or platform.machine()}, {a.threads} threads, {a.rows} generated rows, "
          f"{a.steps} steps of batch {a.batch}, max_length {a.max_length}; runs alternate old/new.\n\n"
          + table(runs, a.old) + "\n")
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(a).items() if k != "out"}
    out.with_suffix(".json").write_text(json.dumps({"settings": settings, "runs": runs,
                                                    "ratios": round_ratios(runs)}, indent=1))
    out.with_suffix(".md").write_text(md)


if __name__ == "__main__":
    main()
