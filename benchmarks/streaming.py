"""Streaming (``streaming: true``) against the cached tokenization, on the same rows, side by side.

One invocation writes its own data (the ``messages`` mix of benchmarks/data_prep.py) and runs each measurement in a
fresh subprocess:

* ``cached``: ``tokenize_files`` in one process (read, render, tokenize, label, write the Arrow cache).
* ``stream, W workers``: one pass over the rows by ``StreamingExamples`` through a torch DataLoader with W worker
  processes (0 = in the main process), batches of 8 examples, as the Trainer consumes them; tokens counted to check
  that the pass produced the same tokens as the cache.

Reported: wall and CPU seconds (process + workers), rows/s (wall), tokens, and the resident memory of the process and
its workers (psutil's PSS, shared pages counted once) sampled at every tenth of the pass, so a memory that grows with the rows read would show.

    python benchmarks/streaming.py                 # 4,000 and 16,000 rows (~5-10 min on 2 loaded cores)
    python benchmarks/streaming.py --sizes 2000    # a quick look

Results: benchmarks/results/streaming.{json,md}. Only ratios from one invocation mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data_prep import _settings, _tokenizer, _usage, write_data  # noqa: E402

BATCH = 8


def _pss_tree_gib() -> float:
    """Proportional set size of this process and its workers: pages the forked workers share with the process are
    counted once in all (a sum of RSS would count them once per process)."""
    import psutil

    me = psutil.Process()
    total = me.memory_full_info().pss
    for child in me.children(recursive=True):
        try:
            total += child.memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**30


def child_cached(data: str, cache: str) -> dict:
    from sftlab.data.dataset import tokenize_files
    from sftlab.data.templates import load_template

    tok = _tokenizer()
    template = load_template(None, tok)
    cpu0, t0 = _usage()["cpu_s"], time.perf_counter()
    ex, summary = tokenize_files([data], "train", tok, template, _settings(), num_workers=1, cache_dir=cache,
                                 overwrite_cache=True)
    u = _usage()
    return {"mode": "cached", "workers": 1, "wall_s": time.perf_counter() - t0, "cpu_s": u["cpu_s"] - cpu0,
            "rows": summary.rows_read, "examples": summary.kept, "tokens": int(ex.lengths().sum()),
            "rss_gib": [], "peak_rss_gib": u["peak_rss_gib"]}


def child_stream(data: str, workers: int, rows: int) -> dict:
    import torch

    from sftlab.data.streaming import POSITION_KEY, StreamingExamples
    from sftlab.data.templates import load_template

    tok = _tokenizer()
    ds = StreamingExamples([data], tok, load_template(None, tok), _settings())
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, num_workers=workers, collate_fn=list)
    cpu0, t0 = _usage()["cpu_s"], time.perf_counter()
    examples = tokens = 0
    samples, next_sample, finished = [], rows // 10, set()
    batches = iter(loader)
    for batch in batches:
        for item in batch:
            shard, _, epoch = item[POSITION_KEY][:3]
            if epoch > 0:
                finished.add(shard)
                continue
            examples += 1
            tokens += len(item["input_ids"])
            if examples >= next_sample:
                samples.append(round(_pss_tree_gib(), 3))
                next_sample += rows // 10
        if len(finished) == max(workers, 1):
            break
    wall = time.perf_counter() - t0
    del batches  # the workers exit and are reaped: their CPU time is counted
    u = _usage()
    return {"mode": "stream", "workers": workers, "wall_s": wall, "cpu_s": u["cpu_s"] - cpu0, "rows": rows,
            "examples": examples, "tokens": tokens, "rss_gib": samples, "peak_rss_gib": u["peak_rss_gib"]}


def run_child(*args: str) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = ["| rows | path | wall s | CPU s | rows/s | tokens | PSS (process + workers) at each tenth of the pass GiB | peak RSS GiB |",
             "|---:|---|---:|---:|---:|---:|---|---:|"]
    for r in results:
        path = "cached (tokenize_files, 1 process)" if r["mode"] == "cached" else \
            f"stream, {r['workers']} dataloader worker(s)"
        rss = " ".join(f"{x:.2f}" for x in r["rss_gib"]) or "-"
        lines.append(f"| {r['rows']:,} | {path} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{r['rows'] / r['wall_s']:,.0f} | {r['tokens']:,} | {rss} | {r['peak_rss_gib']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[4000, 16000])
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        kind, *rest = args.child
        out = child_cached(*rest) if kind == "cached" else child_stream(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(out))
        return
    root = Path(tempfile.mkdtemp(prefix="sftlab-stream-bench-"))
    results = []
    for n in args.sizes:
        data = str(write_data(root / f"rows{n}.jsonl", n))
        results.append(run_child("cached", data, str(root / "cache")))
        for w in args.workers:
            results.append(run_child("stream", data, str(w), str(n)))
            assert results[-1]["tokens"] == results[-2 - args.workers.index(w)]["tokens"], "a pass lost tokens"
        print(table(results), flush=True)
    out = HERE / "results"
    (out / "streaming.json").write_text(json.dumps(results, indent=1))
    (out / "streaming.md").write_text("# Streaming vs cached tokenization (benchmarks/streaming.py)\n\n"
                                      + table(results) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
