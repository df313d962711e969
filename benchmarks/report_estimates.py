"""How close `sftlab data report`'s estimates come to real runs, on the bundled SmolLM2-135M-Instruct on this CPU.

For each configuration (LoRA and full fine-tuning, two cutoff lengths), on the same generated data:

1. `sftlab data report` (in its own process, with the probe): the analytic memory estimate, the probe-based peak
   memory estimate and the time estimate (train_runtime);
2. `sftlab train` with the same config (in its own process): the measured peak RSS (`train_peak_rss_mb`, the
   process's high-water mark at the end of training) and train_runtime.

The table says how far each estimate is from what was measured: (estimate - measured) / measured. The targets are
memory within 25% and time within 30%; the table is written whatever it shows. The machine's load average is
recorded: timings on a shared machine move with it.

    python benchmarks/report_estimates.py                 # 3 configurations, 8 optimizer steps each (~15 min)
    python benchmarks/report_estimates.py --model small --steps 6 --batch 2   # a busy machine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {  # name: (finetuning_type, cutoff_len)
    "lora-256": ("lora", 256),
    "lora-512": ("lora", 512),
    "full-256": ("full", 256),
    "lora-1024": ("lora", 1024),
    "full-512": ("full", 512),
}


def write_data(path: Path, rows: int, seed: int = 0) -> None:
    """Instruction/answer rows of common words, lengths from a few tokens to past 1024 (long tail)."""
    rng = random.Random(seed)
    words = ("the of and to in is that for it as with was on be by this are from at or an have not which one "
             "model data train answer question token memory time step batch length value result").split()
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(rows):
            q = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(3.3, 0.6)) + 3))
            a = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(4.6, 0.8)) + 3))
            fh.write(json.dumps({"instruction": q, "output": a}) + "\n")


def small_model(out: Path) -> str:
    """A randomly initialised 4-layer, 256-wide Llama with the bundled tokenizer (for a busy machine)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sftlab.models.bundled import bundled_tokenizer_dir

    tok = AutoTokenizer.from_pretrained(bundled_tokenizer_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def measure(name: str, work: Path, data: Path, steps: int, batch: int, model: str) -> dict:
    ft, cutoff = CONFIGS[name]
    out = work / name
    load_before = round(os.getloadavg()[0], 1)
    flags = ["--model_name_or_path", model, "--train_file", str(data), "--finetuning_type", ft, "--cutoff_len", str(cutoff),
             "--per_device_train_batch_size", str(batch), "--max_steps", str(steps), "--save_strategy", "no",
             "--logging_steps", "1", "--output_dir", str(out / "run"), "--overwrite_output_dir", "true",
             "--data_cache_dir", str(work / "cache"), "--plot_loss", "false"]
    py = sys.executable
    run([py, "-m", "sftlab", "data", "report", *flags, "--out", str(out / "report")], work / f"{name}-report.log")
    rep = json.loads((out / "report" / "data_report.json").read_text())
    run([py, "-m", "sftlab", "train", *flags], work / f"{name}-train.log")
    res = json.loads((out / "run" / "train_results.json").read_text())
    cost = rep["cost"]
    return {
        "config": name, "model": Path(model).name, "finetuning_type": ft, "cutoff_len": cutoff, "steps": steps, "batch": batch,
        "largest_forward_tokens": cost["plan"]["largest_forward_tokens"],
        "memory_analytic_mb": round(cost["memory"]["total"] / 2**20, 1),
        "memory_probe_mb": round(cost["peak_memory_bytes"] / 2**20, 1),
        "memory_measured_mb": res["train_peak_rss_mb"],
        "time_estimate_s": cost["train_seconds"], "time_measured_s": round(res["train_runtime"], 2),
        "probe_steps": cost["probe"]["steps"] if cost["probe"] else None,
        "report_seconds": rep["timings"]["total_seconds"], "load_before": load_before,
        "load_after": round(os.getloadavg()[0], 1),
    }


def off(est, measured) -> str:
    return "-" if not est or not measured else f"{(est - measured) / measured:+.0%}"


def write_markdown(rows: list[dict], meta: dict, path: Path) -> None:
    lines = ["# `sftlab data report` estimates against real runs", "",
             f"Model: {meta['model']}; {meta['rows']} generated rows, batch {meta['batch']}, "
             f"{meta['steps']} optimizer steps per run, bf16 as sftlab chooses on this CPU; {meta['cpu']}, "
             f"load average {meta['load_before']} before, {meta['load_after']} after. Off by = (estimate - measured) "
             "/ measured. Targets: memory within 25%, time within 30%.", "",
             "| config | largest forward (tokens) | memory analytic (MiB) | off by | memory from probe (MiB) | off by | "
             "measured peak RSS (MiB) | time estimate (s) | measured train_runtime (s) | off by | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['largest_forward_tokens']} | {r['memory_analytic_mb']} | "
                     f"{off(r['memory_analytic_mb'], r['memory_measured_mb'])} | {r['memory_probe_mb']} | "
                     f"{off(r['memory_probe_mb'], r['memory_measured_mb'])} | {r['memory_measured_mb']} | "
                     f"{r['time_estimate_s']} | {r['time_measured_s']} | {off(r['time_estimate_s'], r['time_measured_s'])} | "
                     f"{r['load_before']} / {r['load_after']} |")
    lines += ["", "Produced by `python benchmarks/report_estimates.py`; the raw numbers (probe steps included) are in "
              "report_estimates.json.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="lora-256,lora-512,full-256")
    ap.add_argument("--rows", type=int, default=0, help="default: steps x batch, so that the measured run is one "
                    "whole epoch (its longest batch included, which the memory estimate is for)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", default="bundled", choices=["bundled", "small"],
                    help="bundled: SmolLM2-135M-Instruct; small: a random 4-layer 256-wide Llama (13M parameters, "
                         "most of them the embedding), for a machine too busy for the bundled model")
    ap.add_argument("--append", action="store_true", help="keep the other configurations' rows of the results "
                    "file when it was made with the same model, rows, steps and batch (configurations measured in "
                    "separate invocations on a busy machine)")
    args = ap.parse_args()
    args.rows = args.rows or args.steps * args.batch
    work = Path(tempfile.mkdtemp(prefix="sftlab-report-bench-"))
    sys.path.insert(0, str(ROOT / "src"))
    model = "smollm2-135m-instruct" if args.model == "bundled" else small_model(work / "small-llama")
    data = work / "train.jsonl"
    write_data(data, args.rows)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    meta = {"model": "SmolLM2-135M-Instruct (bundled)" if args.model == "bundled" else
             "random Llama, 4 layers, hidden 256, 13M parameters, bundled tokenizer", "rows": args.rows, "steps": args.steps, "batch": args.batch, "cpu": f"{cpu}, {os.cpu_count()} cores",
            "load_before": round(os.getloadavg()[0], 1)}
    rows = previous_rows(meta, args.configs.split(",")) if args.append else []
    for name in args.configs.split(","):
        rows.append(measure(name, work, data, args.steps, args.batch, model))
        print(json.dumps(rows[-1]), flush=True)
        meta["load_after"] = round(os.getloadavg()[0], 1)
        save(rows, meta)  # after every configuration: a long run stopped early keeps what it measured
    print((RESULTS / "report_estimates.md").read_text())


def previous_rows(meta: dict, configs: list[str]) -> list[dict]:
    path = RESULTS / "report_estimates.json"
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    same = all(old["meta"].get(k) == meta[k] for k in ("model", "rows", "steps", "batch"))
    return [r for r in old["rows"] if r["config"] not in configs] if same else []


def save(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "report_estimates.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    write_markdown(rows, meta, RESULTS / "report_estimates.md")


if __name__ == "__main__":
    main()
