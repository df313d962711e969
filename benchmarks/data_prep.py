"""Data preparation at scale: sftlab's tokenization against TRL 1.16 SFTTrainer's dataset preparation, side by side.

One invocation writes its own data and runs every measurement in a fresh subprocess (so peak RSS and CPU time are
per measurement):

* **Preparation**: the same ``messages`` rows (1-3 exchanges, 30% with a system prompt) at 20k and 200k rows, with
  the bundled SmolLM2 tokenizer and its own chat template, cutoff 2048, at 1 and 2 processes. sftlab:
  ``tokenize_files`` (read, render, tokenize, label the completion tokens, write the Arrow cache). TRL:
  ``load_dataset("json")`` + ``SFTTrainer._prepare_dataset`` (``dataset_num_proc`` = processes), i.e. what
  ``SFTTrainer(train_dataset=...)`` does before training; TRL's default for ``messages`` rows renders each row once
  and trains on every token, so it does less work than sftlab's completion-only labels. Reported: wall seconds,
  CPU seconds (user + system, this process and its workers), rows/s and tokens/s (wall), peak RSS (the largest of
  the process and its workers), and the size of the tokenized data on disk.
* **RSS when the first optimizer step starts**, through the real workflow (``run_sft``, as ``sftlab train`` runs
  it) with a tiny 2-layer model, for 10k, 100k and 1M rows, read from /proc when the Trainer begins step 1.
  The 1M-row cache entry is made by a fast path: the 100k-row file repeated ten times is the 1M-row data file, and
  its cache entry (the key computed by sftlab from that file) is written from the 100k-row entry's arrays repeated
  ten times, so the training run finds it as it would after tokenizing.
* Optionally (``--million``) the 1M-row tokenization itself, timed (wall and CPU seconds) at 2 processes.

    python benchmarks/data_prep.py                       # everything (~30-40 min on 2 loaded cores)
    python benchmarks/data_prep.py --sizes 20000 --procs 1 --no-rss    # a quick look

Results: benchmarks/results/data_prep.{json,md}. Only ratios from one invocation mean anything on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

HERE = Path(__file__).resolve().parent
CUTOFF = 2048
WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now people "
    "my made over did down only way find use may water long little very after words called just where most know "
    "model data training question answer because through between language network value function example "
    "Paris 2048 café résumé naïve 東京 über cost(x) = 3.5 * y; {json: true} <tag> #include \"file.h\""
).split()


# ---- data --------------------------------------------------------------------------------------------------------
def _text(rng: random.Random, mean_words: int) -> str:
    n = max(1, int(rng.lognormvariate(0, 0.6) * mean_words))
    words = rng.choices(WORDS, k=n)
    out, line = [], 0
    for w in words:
        out.append(w)
        line += 1
        if line > 12 and rng.random() < 0.08:
            out[-1] += rng.choice([".", "?", "!", ":"]) + ("\n" if rng.random() < 0.5 else "")
            line = 0
    return " ".join(out).replace("\n ", "\n")


def make_row(rng: random.Random) -> dict:
    msgs = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": _text(rng, 15)})
    for _ in range(rng.randint(1, 3)):
        msgs.append({"role": "user", "content": _text(rng, 35)})
        msgs.append({"role": "assistant", "content": _text(rng, 70)})
    return {"messages": msgs}


def write_data(path: Path, n: int, seed: int = 0) -> Path:
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps(make_row(rng), ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def repeat_file(src: Path, dst: Path, times: int) -> Path:
    if not dst.is_file():
        with open(dst.with_suffix(".tmp"), "wb") as out:
            for _ in range(times):
                with open(src, "rb") as fh:
                    shutil.copyfileobj(fh, out, 1 << 24)
        os.replace(dst.with_suffix(".tmp"), dst)
    return dst


# ---- measurements in child processes -------------------------------------------------------------------------
def _usage() -> dict:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"cpu_s": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
            "main_cpu_s": me.ru_utime + me.ru_stime,
            "peak_rss_gib": max(me.ru_maxrss, kids.ru_maxrss) / 2**20}


def _tokenizer():
    from transformers import AutoTokenizer

    from sftlab.models.bundled import bundled_tokenizer_dir

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def _settings():
    from sftlab.data.dataset import EncodeSettings
    from sftlab.data.formats import FormatOptions

    return EncodeSettings("completion", CUTOFF, "keep_answer", None, {}, FormatOptions())


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def child_sftlab(data: str, procs: int, cache: str) -> dict:
    from sftlab.data.dataset import tokenize_files
    from sftlab.data.templates import load_template

    tok = _tokenizer()
    template = load_template(None, tok)
    start, t0, load0 = _usage(), time.perf_counter(), os.getloadavg()[0]
    ex, summary = tokenize_files([data], "train", tok, template, _settings(), num_workers=procs, cache_dir=cache,
                                 overwrite_cache=True)
    wall = time.perf_counter() - t0
    u = _usage()
    return {"wall_s": wall, "cpu_s": u["cpu_s"] - start["cpu_s"], "main_cpu_s": u["main_cpu_s"] - start["main_cpu_s"],
            "load_avg": [load0, os.getloadavg()[0]], "peak_rss_gib": u["peak_rss_gib"],
            "rows": summary.rows_read, "kept": summary.kept, "tokens": int(ex.lengths().sum()),
            "trained_tokens": summary.trained_tokens, "disk_bytes": dir_bytes(Path(ex.path).parent)}


def child_trl(data: str, procs: int, cache: str) -> dict:
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = _tokenizer()
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    args = SFTConfig(output_dir=os.path.join(cache, "out"), max_length=CUTOFF, packing=False,
                     dataset_num_proc=procs if procs > 1 else None, report_to=[], use_cpu=True)
    tiny = datasets.Dataset.from_list([make_row(random.Random(1))])
    trainer = SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tok)
    torch.set_num_threads(1)
    start_cpu, t0, load0 = _usage()["cpu_s"], time.perf_counter(), os.getloadavg()[0]
    ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=os.path.join(cache, "hf"))
    t_load = time.perf_counter() - t0
    ds = trainer._prepare_dataset(ds, tok, args, False, None, "train")
    wall = time.perf_counter() - t0
    u = _usage()
    lengths = ds.map(lambda b: {"n": [len(x) for x in b["input_ids"]]}, batched=True, remove_columns=ds.column_names)
    tokens = int(sum(lengths["n"]))
    return {"wall_s": wall, "load_s": t_load, "cpu_s": u["cpu_s"] - start_cpu, "peak_rss_gib": u["peak_rss_gib"],
            "load_avg": [load0, os.getloadavg()[0]],
            "rows": len(ds), "kept": len(ds), "tokens": tokens,
            "disk_bytes": sum(os.path.getsize(f["filename"]) for f in ds.cache_files)}


def child_first_step(data: str, model_dir: str, cache: str, out: str) -> dict:
    """RSS when the Trainer begins its first optimizer step, through run_sft (what `sftlab train` runs)."""
    from transformers import TrainerCallback

    from sftlab.workflow import run_sft

    seen: dict = {}

    class FirstStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if not seen:
                seen["rss_gib"] = _rss_now()
                control.should_training_stop = True

    run_sft(_run_config(data, model_dir, cache, out), callbacks=[FirstStep()])
    return {"rss_first_step_gib": seen.get("rss_gib"), "peak_rss_gib": _usage()["peak_rss_gib"]}


def _rss_now() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- the 1M-row cache entry by repetition ------------------------------------------------------------------------
def _run_config(data: str, model_dir: str, cache: str, out: str):
    from sftlab.config import parse_config

    return parse_config(["--model_name_or_path", model_dir, "--train_file", data, "--output_dir", out,
                         "--data_cache_dir", cache, "--max_steps", "2", "--per_device_train_batch_size", "4",
                         "--save_strategy", "no", "--logging_steps", "1", "--bf16", "false",
                         "--cutoff_len", str(CUTOFF), "--report_to", "none", "--plot_loss", "false",
                         "--preprocessing_num_workers", "2"])


def repeated_cache_entry(src_data: Path, big_data: Path, times: int, cache: Path, model_dir: str) -> None:
    """Write the cache entry that `sftlab train` computes for big_data (src_data repeated `times` times) from
    src_data's entry, repeated: the tokenizer, template and settings are resolved as the workflow resolves them."""
    sys.path.insert(0, str(HERE.parent / "src"))
    from dataclasses import asdict

    import numpy as np

    from sftlab.data.dataset import DataSummary, cache_key, tokenize_files
    from sftlab.data.splits import encode_settings
    from sftlab.data.store import ExampleWriter
    from sftlab.models.load import load_tokenizer
    from sftlab.data.templates import resolve_template

    cfg = _run_config(str(src_data), model_dir, str(cache), str(cache / "unused"))
    tok = load_tokenizer(model_dir)
    template = resolve_template(cfg, tok, model_dir)
    settings = encode_settings(cfg)
    key = cache_key([str(big_data)], tok, template, settings, None)
    if (cache / key[:32] / "summary.json").is_file():
        return
    small, summary = tokenize_files([str(src_data)], "train", tok, template, settings, num_workers=2,
                                    cache_dir=str(cache))
    writer = ExampleWriter(cache / key[:32])
    for _ in range(times):
        for b in range(len(small._ids)):
            offs = small._offsets[b]
            writer.write(small._ids[b][offs[0]:offs[-1]], small._labels[b][offs[0]:offs[-1]], np.diff(offs))
    big = DataSummary(**asdict(summary))
    for k in ("rows_read", "kept", "truncated", "prompt_tokens", "trained_tokens"):
        setattr(big, k, getattr(summary, k) * times)
    big.dropped = {k: v * times for k, v in summary.dropped.items()}
    big.formats = {k: v * times for k, v in summary.formats.items()}
    writer.commit({"summary.json": json.dumps(asdict(big))})


def tiny_model(out: Path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ---- report ------------------------------------------------------------------------------------------------------
def prep_table(results: list[dict]) -> str:
    lines = ["| rows | processes | library | wall s | CPU s | CPU ms/row | rows/s | tokens/s | rows per CPU s | "
             "peak RSS GiB | tokens | on disk MiB | load avg |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        load = "-".join(f"{x:.1f}" for x in r.get("load_avg", []))
        lines.append(f"| {r['n']:,} | {r['procs']} | {r['lib']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | "
                     f"{1000 * r['cpu_s'] / r['rows']:.2f} | {r['rows'] / r['wall_s']:,.0f} | "
                     f"{r['tokens'] / r['wall_s']:,.0f} | {r['rows'] / r['cpu_s']:,.0f} | {r['peak_rss_gib']:.2f} | "
                     f"{r['tokens']:,} | {r['disk_bytes'] / 2**20:,.0f} | {load} |")
    ratios = []
    for r in results:
        if r["lib"] != "sftlab":
            continue
        t = next((x for x in results if x["lib"] == "trl" and x["n"] == r["n"] and x["procs"] == r["procs"]), None)
        if t:
            ratios.append(f"- {r['n']:,} rows, {r['procs']} process(es): sftlab {t['wall_s'] / r['wall_s']:.2f}x "
                          f"TRL's rows/s (wall), {t['cpu_s'] / r['cpu_s']:.2f}x per CPU second")
    return "\n".join(lines + [""] + ratios)


def million_line(m: dict) -> str:
    load = "-".join(f"{x:.1f}" for x in m.get("load_avg", []))
    return (f"1M rows at {m['procs']} processes: {m['wall_s']:.0f} s wall (load average {load}), {m['cpu_s']:.0f} CPU s "
            f"({1000 * m['cpu_s'] / m['rows']:.2f} CPU ms per row; main process {m.get('main_cpu_s', float('nan')):.0f} "
            f"CPU s), {m['rows'] / m['wall_s']:,.0f} rows/s; on two idle cores about {m['cpu_s'] / 2:.0f} s "
            f"(CPU s / 2); peak RSS {m['peak_rss_gib']:.2f} GiB, {m['disk_bytes'] / 2**30:.2f} GiB on disk, "
            f"{m['tokens']:,} tokens.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="20000,200000")
    ap.add_argument("--procs", default="1,2")
    ap.add_argument("--big-procs", default="2", help="process counts for the sizes above 50k rows")
    ap.add_argument("--libs", default="sftlab,trl")
    ap.add_argument("--rss-sizes", default="10000,100000,1000000")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--million", action="store_true", help="also time the tokenization of 1M rows (2 processes)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sftlab-data-prep-bench"))
    ap.add_argument("--out", default=str(HERE / "results" / "data_prep"))
    a = ap.parse_args()
    if a.child:
        kind, *rest = a.child
        fn = {"sftlab": child_sftlab, "trl": child_trl, "first_step": child_first_step}[kind]
        print(json.dumps(fn(*[int(x) if x.isdigit() else x for x in rest])))
        return

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}, "prep": [], "first_step": []}
    sizes = [int(x) for x in a.sizes.split(",") if x]
    for n in sizes:
        data = write_data(work / f"rows{n}.jsonl", n)
        for procs in [int(x) for x in (a.procs if n <= 50_000 else a.big_procs).split(",")]:
            for lib in a.libs.split(","):
                cache = tempfile.mkdtemp(dir=work, prefix=f"{lib}-cache-")
                r = {"n": n, "procs": procs, "lib": lib, **run_child(lib, str(data), str(procs), cache)}
                shutil.rmtree(cache, ignore_errors=True)
                print(json.dumps(r), flush=True)
                report["prep"].append(r)
    if a.million:
        big = repeat_file(write_data(work / "rows200000.jsonl", 200_000), work / "rows1000000.jsonl", 5)
        cache = tempfile.mkdtemp(dir=work, prefix="million-")
        r = {"n": 1_000_000, "procs": 2, "lib": "sftlab", **run_child("sftlab", str(big), "2", cache)}
        shutil.rmtree(cache, ignore_errors=True)
        print(json.dumps(r), flush=True)
        report["million"] = r
    if not a.no_rss:
        model = tiny_model(work / "tiny-model") if not (work / "tiny-model").is_dir() else str(work / "tiny-model")
        cache = work / "rss-cache"
        for n in [int(x) for x in a.rss_sizes.split(",")]:
            if n >= 1_000_000:
                src = write_data(work / f"rows{n // 10}.jsonl", n // 10)
                data = repeat_file(src, work / f"rows{n}-x10.jsonl", 10)
                repeated_cache_entry(src, data, 10, cache, model)
            else:
                data = write_data(work / f"rows{n}.jsonl", n)
            out = tempfile.mkdtemp(dir=work, prefix="run-")
            r = {"n": n, **run_child("first_step", str(data), model, str(cache), out)}
            shutil.rmtree(out, ignore_errors=True)
            print(json.dumps(r), flush=True)
            report["first_step"].append(r)
    report["machine"]["load_avg_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
    md = ["# Data preparation: sftlab vs TRL 1.16 (benchmarks/data_prep.py)", "",
          f"{os.cpu_count()} CPUs, load average {report['machine']['load_avg_start'][0]:.1f} at the start and "
          f"{report['machine']['load_avg_end'][0]:.1f} at the end (the machine is shared).", "",
          prep_table(report["prep"]) if report["prep"] else ""]
    if "million" in report:
        m = report["million"]
        md += ["", million_line(m)]
    if report["first_step"]:
        md += ["", "| rows | RSS at the first optimizer step GiB | peak RSS GiB |", "|---:|---:|---:|"]
        md += [f"| {r['n']:,} | {r['rss_first_step_gib']:.2f} | {r['peak_rss_gib']:.2f} |" for r in report["first_step"]]
    Path(a.out + ".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
