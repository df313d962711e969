"""Two ranks on one machine share the tokenized data: memory of `sftlab train` at its first optimizer step, one
process against `torchrun --nproc_per_node 2 -m sftlab train` (gloo, CPU), both launched exactly as a user would.

The data: generated ``messages`` rows (the mix of benchmarks/data_prep.py). To keep the benchmark short, a small
file is tokenized for real and the big file is that file repeated; its cache entry (under the key sftlab computes
for the big file) is the small entry's arrays repeated (`data_prep.repeated_cache_entry`), so `sftlab train` finds
it as it would after tokenizing. Every run uses a tiny random 2-layer Llama and the bundled SmolLM2 tokenizer.

A ``sitecustomize`` put on the children's path adds a callback to `run_sft` (what ``sftlab train`` runs). When
the first optimizer step begins, each rank reads /proc/self/smaps_rollup (Rss, Pss) and, from /proc/self/smaps,
the mappings of the tokenized data (``examples.arrow``: Rss, Pss, shared and private pages), then stops the run.
Two moments are measured, both with every rank waiting for the others (a barrier) before reading, so the shared
pages are counted while both map them:

* ``first step``: as the run reaches it (the examples are read lazily, so little of the file is touched);
* ``all touched``: after the rank has read every token of its examples through the same memory map (what a rank
  holds after a full epoch): the file is then resident, and Pss shows who pays for it.

Pss (proportional set size) charges a shared page 1/n to each of the n processes mapping it: if the two ranks
shared nothing, each rank's Pss would equal its Rss; the sum of the ranks' Pss is what the machine pays.

    python benchmarks/data_memory.py                    # 1M rows (~10-20 min on 2 loaded cores)
    python benchmarks/data_memory.py --rows 200000 --repeat 10

Results: benchmarks/results/data_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import data_prep as D  # noqa: E402  (the data, the tiny model, the repeated cache entry)

SITE = r'''
import os, sys
if os.environ.get("SFTLAB_MEMORY_DIR"):
    import importlib.abc, importlib.util

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "sftlab.workflow":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                sys.path.insert(0, os.environ["SFTLAB_MEMORY_BENCH"])
                from data_memory import add_probe
                add_probe(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


# ---- in the training processes --------------------------------------------------------------------------------
def read_memory() -> dict:
    """Rss/Pss of this process and of its mappings of examples.arrow, in MiB (from /proc/self/smaps*)."""
    out = {}
    for line in open("/proc/self/smaps_rollup"):
        k, _, rest = line.partition(":")
        if k in ("Rss", "Pss", "Shared_Clean", "Private_Clean", "Private_Dirty", "Anonymous"):
            out[k.lower() + "_mib"] = int(rest.split()[0]) / 1024
    arrow = {"size_mib": 0.0, "rss_mib": 0.0, "pss_mib": 0.0, "shared_clean_mib": 0.0, "private_clean_mib": 0.0}
    inside = False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if len(head) >= 5 and "-" in head[0] and not line.startswith(("Size", "Rss", "Pss")) and ":" not in head[0]:
            inside = line.rstrip().endswith("examples.arrow")
            continue
        if inside:
            k, _, rest = line.partition(":")
            key = {"Size": "size_mib", "Rss": "rss_mib", "Pss": "pss_mib", "Shared_Clean": "shared_clean_mib",
                   "Private_Clean": "private_clean_mib"}.get(k)
            if key:
                arrow[key] += int(rest.split()[0]) / 1024
    out["arrow"] = arrow
    return out


def _touch_every_token() -> int:
    """Read every token of every memory-mapped example set of this process, through its own mapping."""
    import gc

    import numpy as np

    from sftlab.data.store import TokenizedExamples

    total = 0
    for ex in [o for o in gc.get_objects() if isinstance(o, TokenizedExamples)]:
        for arr in ex._ids + ex._labels:
            total += int(np.add.reduce(arr, dtype=np.int64))
    return total


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def add_probe(workflow) -> None:
    """Make workflow.run_sft measure memory when the first optimizer step begins, then stop."""
    from transformers import TrainerCallback

    out_dir = Path(os.environ["SFTLAB_MEMORY_DIR"])
    rank = os.environ.get("RANK", "0")

    class MemoryAtFirstStep(TrainerCallback):
        done = False

        def on_step_begin(self, args, state, control, **kw):
            if self.done:
                return
            self.done = True
            _barrier()
            first = read_memory()
            _barrier()
            _touch_every_token()
            _barrier()
            touched = read_memory()
            _barrier()
            (out_dir / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "pid": os.getpid(),
                                                                  "first_step": first, "all_touched": touched}))
            control.should_training_stop = True

    run_sft = workflow.run_sft

    def probed(cfg, callbacks=None):
        return run_sft(cfg, callbacks=[*(callbacks or []), MemoryAtFirstStep()])

    workflow.run_sft = probed


# ---- the driver ----------------------------------------------------------------------------------------------
def train_argv(data: str, model: str, cache: str, out: str) -> list[str]:
    return ["--model_name_or_path", model, "--train_file", data, "--output_dir", out, "--data_cache_dir", cache,
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--save_strategy", "no",
            "--logging_steps", "1", "--bf16", "false", "--cutoff_len", str(D.CUTOFF), "--report_to", "none",
            "--plot_loss", "false", "--preprocessing_num_workers", "2"]


def launch(ranks: int, argv: list[str], site: Path, out_dir: Path) -> list[dict]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "SFTLAB_MEMORY_DIR": str(out_dir),
           "SFTLAB_MEMORY_BENCH": str(HERE),
           "PYTHONPATH": os.pathsep.join([str(site), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    if ranks == 1:
        cmd = [sys.executable, "-m", "sftlab", "train", *argv]
    else:
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(ranks), "-m", "sftlab",
               "train", *argv]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(HERE.parent))
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def table(report: dict) -> str:
    lines = ["| run | rank | moment | process Rss MiB | process Pss MiB | examples.arrow mapped MiB | arrow Rss MiB | "
             "arrow Pss MiB | arrow shared MiB | arrow private MiB |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        for r in run["ranks"]:
            for moment in ("first_step", "all_touched"):
                m = r[moment]
                a = m["arrow"]
                lines.append(f"| {run['name']} | {r['rank']} | {moment.replace('_', ' ')} | {m['rss_mib']:,.0f} | "
                             f"{m['pss_mib']:,.0f} | {a['size_mib']:,.0f} | {a['rss_mib']:,.0f} | {a['pss_mib']:,.0f} | "
                             f"{a['shared_clean_mib']:,.0f} | {a['private_clean_mib']:,.0f} |")
    sums = []
    for run in report["runs"]:
        for moment in ("first_step", "all_touched"):
            pss = sum(r[moment]["pss_mib"] for r in run["ranks"])
            rss = sum(r[moment]["rss_mib"] for r in run["ranks"])
            sums.append(f"- {run['name']}, {moment.replace('_', ' ')}: sum of Pss {pss:,.0f} MiB, sum of Rss "
                        f"{rss:,.0f} MiB")
    return "\n".join(lines + [""] + sums)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=50, help="the big file is a file of rows/repeat rows, repeated")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sftlab-data-memory-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "data_memory"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = str(work / "tiny-model") if (work / "tiny-model").is_dir() else D.tiny_model(work / "tiny-model")
    small = D.write_data(work / f"rows{a.rows // a.repeat}.jsonl", a.rows // a.repeat)
    big = D.repeat_file(small, work / f"rows{a.rows}-x{a.repeat}.jsonl", a.repeat)
    cache = work / "cache"
    D.repeated_cache_entry(small, big, a.repeat, cache, model)
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    report = {"rows": a.rows, "machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "runs": []}
    for name, ranks in (("1 process", 1), ("torchrun, 2 ranks", 2)):
        out_dir = Path(tempfile.mkdtemp(dir=work, prefix="mem-"))
        t0 = time.perf_counter()
        ranks_out = launch(ranks, train_argv(str(big), model, str(cache), str(out_dir / "run")), site, out_dir)
        report["runs"].append({"name": name, "ranks": ranks_out, "wall_s": time.perf_counter() - t0})
        print(json.dumps(report["runs"][-1]), flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    report["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    md = ["# Memory of the tokenized data with two ranks on one machine (benchmarks/data_memory.py)", "",
          f"{a.rows:,} rows; {os.cpu_count()} CPUs, load average {report['machine']['load_avg_start'][0]:.1f} at the "
          f"start and {report['machine']['load_avg_end'][0]:.1f} at the end (the machine is shared).", "",
          table(report)]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
