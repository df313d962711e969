"""`sftlab data report` at scale: wall time, CPU time and peak memory on a generated data set of 20k and 200k rows.

The rows are data_prep.py's mix (``messages`` rows of 1-3 exchanges, 30% with a system prompt), plus an eval file
of 2,000 rows with a known overlap: 100 exact copies of training rows (case and spacing changed), 100 near copies
(one word in 40 of the last message changed, rows of 120+ words; their exact Jaccard similarity is computed, so the
known count of near copies at the 0.8 threshold is exact) and 1,800 fresh rows. Each size is reported twice through the real
entry point (``sftlab data report cfg.yaml --no_probe``, a subprocess): cold (an empty data cache: tokenization,
statistics and the duplicate scan) and warm (the cache present, as after ``sftlab train`` or an earlier report:
statistics from the memory-mapped cache and the duplicate scan). Measured: wall seconds, CPU seconds of the report
and every process it started (user + system), peak RSS of the largest process and of the process tree (sampled
every 0.2 s with psutil), and the load average around each run.

    python benchmarks/report_scale.py                  # 20k and 200k rows, cold and warm (~15 min on 2 loaded cores)
    python benchmarks/report_scale.py --sizes 20000    # a quick look

Results: benchmarks/results/report_scale.{json,md}. The machine is shared: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from data_prep import make_row, write_data  # noqa: E402  (the same generated rows as the data_prep benchmark)

EVAL_ROWS, EXACT, NEAR = 2000, 100, 100
CUTOFF = 1024


def _picked(train: Path) -> list[tuple[int, dict]]:
    """(line, row) of the training rows the eval copies are made from: every 97th row with 120+ words."""
    picked = []
    with open(train, encoding="utf-8") as fh:
        for i, line in enumerate(fh, start=1):
            if i % 97 == 4:
                row = json.loads(line)
                if len(" ".join(m["content"] for m in row["messages"]).split()) >= 120:
                    picked.append((i, row))
            if len(picked) == EXACT + NEAR:
                break
    return picked


def write_eval(train: Path, out: Path, seed: int = 1) -> None:
    """Eval rows: EXACT exact copies (case and spacing changed) and NEAR near copies (one word in 40 of the last
    message changed) of training rows, the rest fresh."""
    if out.is_file():
        return
    rng = random.Random(seed)
    picked = [row for _, row in _picked(train)]
    rows = []
    for row in picked[:EXACT]:
        rows.append({"messages": [dict(m, content=m["content"].upper().replace(" ", "  ")) for m in row["messages"]]})
    for row in picked[EXACT:]:
        msgs = [dict(m) for m in row["messages"]]
        last = msgs[-1]["content"].split(" ")
        words = sum(len(m["content"].split()) for m in msgs)
        for _ in range(max(1, words // 40)):
            last[rng.randrange(len(last))] = f"changed{rng.randrange(10**6)}"
        msgs[-1]["content"] = " ".join(last)
        rows.append({"messages": msgs})
    rng_fresh = random.Random(seed + 100)
    rows += [make_row(rng_fresh) for _ in range(EVAL_ROWS - len(rows))]
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def known_overlap(train: Path, eval_file: Path, threshold: float = 0.8) -> dict:
    """What the eval file repeats, computed exactly: exact copies, and near copies whose true Jaccard similarity of
    word 3-shingles with their training row is >= threshold (the report estimates it by MinHash)."""
    sys.path.insert(0, str(ROOT / "src"))
    from sftlab.data.duplicates import normalise, shingles

    def text(row: dict) -> str:
        return "\n".join(m["content"] for m in row["messages"])

    with open(eval_file, encoding="utf-8") as fh:
        copies = [json.loads(l) for _, l in zip(range(EXACT + NEAR), fh)]
    jac = []
    for (_, original), copy in zip(_picked(train)[EXACT:], copies[EXACT:]):
        a, b = shingles(normalise(text(original))), shingles(normalise(text(copy)))
        jac.append(len(a & b) / len(a | b))
    return {"exact": EXACT, "near_copies": len(jac), "near_at_or_above_threshold": sum(j >= threshold for j in jac),
            "near_jaccard_min_max": [round(min(jac), 3), round(max(jac), 3)]}


def run_report(cfg: Path, out: Path) -> dict:
    """The report as a user runs it, in a subprocess; wall and CPU seconds, peak RSS."""
    import psutil

    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), TOKENIZERS_PARALLELISM="false")
    load = os.getloadavg()[0]
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sftlab", "data", "report", str(cfg), "--no_probe", "--out", str(out)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree_peak = largest = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [root] + root.children(recursive=True)]
            tree_peak, largest = max(tree_peak, sum(rss)), max(largest, max(rss))
        except psutil.Error:
            pass
        time.sleep(0.2)
    output = proc.stdout.read()
    wall = time.perf_counter() - t0
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"report failed ({proc.returncode}):\n{output[-3000:]}")
    data = json.loads((out / "data_report.json").read_text())
    return {"wall_s": round(wall, 1),
            "cpu_s": round((after.children_user - before.children_user) + (after.children_system - before.children_system), 1),
            "peak_rss_largest_process_gib": round(largest / 2**30, 2),
            "peak_rss_tree_gib": round(tree_peak / 2**30, 2), "load_before": round(load, 1),
            "load_after": round(os.getloadavg()[0], 1), "timings": data["timings"],
            "summary": [l for l in output.splitlines() if l.startswith(("[", "cost")) and "|" not in l],
            "train": {k: data["splits"]["train"][k] for k in ("rows_read", "kept", "truncated", "tokens",
                                                              "trained_tokens", "markup_tokens", "answers_cut")},
            "duplicates": {k: {"exact": v["exact"], "near": v["near"]} for k, v in data["duplicates"].items()}}


def write_config(work: Path, train: Path, eval_file: Path, cache: Path, workers: int) -> Path:
    cfg = work / f"cfg-{train.stem}.yaml"
    cfg.write_text(f"model_name_or_path: smollm2-135m-instruct\ntrain_file: {train}\neval_file: {eval_file}\n"
                   f"cutoff_len: {CUTOFF}\nfinetuning_type: lora\nper_device_train_batch_size: 4\n"
                   f"preprocessing_num_workers: {workers}\ndata_cache_dir: {cache}\noutput_dir: {work / 'run'}\n")
    return cfg


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# `sftlab data report` at scale (benchmarks/report_scale.py)", "",
             f"{meta['cpu']}; the machine is shared with other jobs (load averages per run below). Generated "
             f"`messages` rows (1-3 exchanges, 30% with a system prompt, data_prep.py's mix), bundled SmolLM2 "
             f"tokenizer and template, cutoff_len {CUTOFF}, `preprocessing_num_workers: {meta['workers']}`, "
             f"`--no_probe`. Eval file: {EVAL_ROWS} rows, {EXACT} exact and up to {NEAR} near copies of training rows (as many as the file has rows of 120+ words at the picked lines) "
             "(known near = those whose exact Jaccard similarity of word 3-shingles is >= 0.8). "
             "cold = empty data cache (tokenize + statistics + duplicates); warm = the cache present (as after "
             "`sftlab train` or an earlier report). CPU s = user + system of the report and its workers.", "",
             "| rows | cache | wall s | CPU s | tokens s | duplicates s | peak RSS, largest process GiB | "
             "peak RSS, process tree GiB | load avg before / after | eval exact / near found | known exact / near |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        t = r["timings"]
        tok = sum(v for k, v in t.items() if k.endswith("_tokens_seconds"))
        dup = sum(v for k, v in t.items() if k.endswith("_duplicates_seconds"))
        ev = r["duplicates"].get("eval", {})
        lines.append(f"| {r['rows']:,} | {r['cache']} | {r['wall_s']} | {r['cpu_s']} | {tok:.1f} | {dup:.1f} | "
                     f"{r['peak_rss_largest_process_gib']} | {r['peak_rss_tree_gib']} | {r['load_before']} / "
                     f"{r['load_after']} | {ev.get('exact')} / {ev.get('near')} | {r['expected_eval']['exact']} / "
                     f"{r['expected_eval']['near_at_or_above_threshold']} |")
    lines += ["", "Produced by `python benchmarks/report_scale.py`; every number and the printed summaries are in "
              "report_scale.json.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sftlab-report-scale"))
    ap.add_argument("--out", default=str(HERE / "results" / "report_scale"))
    ap.add_argument("--kinds", default="cold,warm", help="which runs: cold (the cache emptied first), warm")
    ap.add_argument("--append", action="store_true", help="keep the results file's other runs")
    ap.add_argument("--render", action="store_true", help="only write the table again from the results JSON "
                    "(the known overlap recomputed from the files under --work)")
    a = ap.parse_args()
    work = Path(a.work)
    if a.render:
        return render(Path(a.out), work)
    work.mkdir(parents=True, exist_ok=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = {"cpu": f"{cpu}, {os.cpu_count()} cores", "workers": a.workers}
    kinds = a.kinds.split(",")
    sizes = [int(x) for x in a.sizes.split(",") if x]
    rows = []
    if a.append and Path(a.out + ".json").is_file():
        rows = [r for r in json.loads(Path(a.out + ".json").read_text())["runs"]
                if not (r["rows"] in sizes and r["cache"] in kinds)]
    for n in sizes:
        train = write_data(work / f"train{n}.jsonl", n)
        eval_file = work / f"eval{n}.jsonl"
        write_eval(train, eval_file)
        expected = known_overlap(train, eval_file)
        cache = work / f"cache{n}"
        if "cold" in kinds:
            shutil.rmtree(cache, ignore_errors=True)
        cfg = write_config(work, train, eval_file, cache, a.workers)
        for kind in kinds:
            r = {"rows": n, "cache": kind, "expected_eval": expected, **run_report(cfg, work / f"report{n}-{kind}")}
            print(json.dumps(r), flush=True)
            rows.append(r)
            save(Path(a.out), rows, meta)  # after every run: a run stopped early keeps what it measured
    print(markdown(rows, meta))


def save(out: Path, rows: list[dict], meta: dict) -> None:
    rows = sorted(rows, key=lambda r: (r["rows"], r["cache"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + ".json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=1) + "\n")
    Path(str(out) + ".md").write_text(markdown(rows, meta))


def render(out: Path, work: Path) -> None:
    data = json.loads(Path(str(out) + ".json").read_text())
    for r in data["runs"]:
        n = r["rows"]
        r["expected_eval"] = known_overlap(work / f"train{n}.jsonl", work / f"eval{n}.jsonl")
    Path(str(out) + ".json").write_text(json.dumps(data, indent=1) + "\n")
    Path(str(out) + ".md").write_text(markdown(data["runs"], data["meta"]))
    print(markdown(data["runs"], data["meta"]))


if __name__ == "__main__":
    main()
