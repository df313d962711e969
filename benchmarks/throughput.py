"""Training throughput: sftlab against TRL's SFTTrainer on the bundled SmolLM2-135M-Instruct, LoRA and full FT.

One invocation runs every configuration side by side, each in its own subprocess (so peak RSS is per
configuration), on the same generated data, with the same hyperparameters and the same number of optimizer steps:

* ``trl_default``   TRL 1.16 ``SFTConfig`` defaults (bf16 autocast, padded batches, gradient checkpointing).
* ``trl_fastest``   TRL's fastest setup on this CPU: bf16, BFD packing + padding-free, gradient checkpointing off
                    (memory is plentiful here, and checkpointing only adds a recomputed forward).
* ``sftlab``        sftlab's default configuration (unpacked).
* ``sftlab_packing`` sftlab with ``packing: true``.

The data set (written once, deterministic) is conversational prompt/completion rows whose prompt and answer
lengths are drawn from a log-normal (tens to hundreds of tokens, long tail), every example within max_length.
Both libraries train on the completion tokens only. Unpacked configurations take ``--batch`` examples per step;
packed ones take as many packed rows per step as spread the same examples over the same number of steps, so
every configuration sees (about) the same examples and tokens per optimizer step and the losses are comparable.

Reported per configuration: trained tokens/s (tokens with a label), non-pad tokens/s, peak RSS while training
(the process's high-water mark when training ends, before the benchmark's own held-out evaluation, whose full
vocabulary logits would otherwise set the peak for the smaller configurations) and over the whole process, the mean
training loss over the last quarter of steps, a held-out loss computed the same way for everyone after training,
and MFU against the bf16 matmul peak measured here. MFU = k * N * non-pad tokens/s / peak with N the model's
parameters (134.5M, all in the matmul path: the LM head is tied to the embedding), k = 6 for full fine-tuning
and k = 4 for LoRA (frozen weights need no weight gradients); LoRA's own FLOPs are ignored (<1%).

    python benchmarks/throughput.py                        # the README run: 96 rows, 12 steps (~15 min, 2 cores)
    python benchmarks/throughput.py --rows 24 --modes lora # quick look (~3 min)
    python benchmarks/throughput.py --modes lora --configs sftlab,sftlab_packing

Results go to benchmarks/results/throughput.{json,md}. Run it on a quiet machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

CONFIGS = ("trl_default", "trl_fastest", "llamafactory_fastest", "llamafactory_fp32", "sftlab", "sftlab_packing")
LLAMAFACTORY = ("llamafactory_fastest", "llamafactory_fp32")
BENCH_DIR = Path(__file__).resolve().parent
MODES = ("lora", "full")
LR = {"lora": 2e-4, "full": 2e-5}
N_PARAMS = 134_515_008  # SmolLM2-135M, tied embedding / LM head
WORDS = (
    "the of and to in is that it was for on are as with his they at be this from have or by one had not but what "
    "all were when we there can an your which their said if do will each about how up out them then she many some "
    "so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where most "
    "know get through back much before go good new write our used me man too any day same right look think also "
    "around another came come work three word must because does part even place well such here take why things "
    "help put years different away again off went old number great tell men say small every found still between "
    "name should home big give air line set own under read last never us left end along while might next sound "
    "below saw something thought both few those always looked show large often together asked house don't world "
    "going want school important until form food keep children feet land side without boy once animals life "
    "enough took sometimes four head above kind began almost live page got earth need far hand high year mother "
    "light parts country father let night following picture being study second eyes soon times story boys since "
    "white days ever paper hard near sentence better best across during today others however sure means knew "
    "whether model training data token gradient batch loss layer attention matrix vector python function"
).split()


# ---- data -----------------------------------------------------------------------------------------------------
def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    # Sentences of 6-16 words with punctuation, so the tokenizer sees ordinary prose.
    out, i = [], 0
    while i < len(words):
        k = rng.randint(6, 16)
        s = " ".join(words[i : i + k])
        out.append(s[:1].upper() + s[1:] + rng.choice([".", ".", ".", "?", "!"]))
        i += k
    return " ".join(out)


def make_rows(n: int, seed: int, tokenizer, max_length: int) -> list[dict]:
    """Conversational prompt/completion rows with long-tailed lengths; each fits max_length with its template."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        p_words = int(min(max(rng.lognormvariate(math.log(45), 0.8), 8), 350))
        a_words = int(min(max(rng.lognormvariate(math.log(40), 0.9), 4), 350))
        prompt, answer = _text(rng, p_words), _text(rng, a_words)
        msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
        n_tok = len(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
        if n_tok > max_length - 4:
            continue  # keep every example whole: truncation policies differ between the libraries
        rows.append({"prompt": msgs[:1], "completion": msgs[1:]})
    return rows


def write_data(workdir: Path, rows: int, eval_rows: int, max_length: int) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    from sftlab.models.bundled import bundled_model_dir

    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    train, evals = workdir / "train.jsonl", workdir / "eval.jsonl"
    for path, n, seed in ((train, rows, 1234), (evals, eval_rows, 999)):
        with open(path, "w") as fh:
            for r in make_rows(n, seed, tok, max_length):
                fh.write(json.dumps(r) + "\n")
    return train, evals


def packed_batch(train: Path, tokenizer, max_length: int, steps: int) -> int:
    """Packed rows per step so that one pass over the examples takes `steps` steps (BFD, like both libraries)."""
    from sftlab.data.packing import bfd_pack

    lengths = []
    for line in open(train):
        r = json.loads(line)
        lengths.append(len(tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True,
                                                         return_dict=True)["input_ids"]))
    return max(1, math.ceil(len(bfd_pack(lengths, max_length)) / steps))


# ---- measuring ------------------------------------------------------------------------------------------------
def matmul_peak(threads: int, dtype: str, max_n: int = 4096, budget_s: float = 0.25) -> float:
    """Best-of matmul FLOP/s in this dtype with this many threads. The size doubles from 256 until one product
    takes `budget_s` (or reaches max_n): CPUs without native bf16 (AVX2 only) run bf16 products ~10-100x slower
    than fp32, and a fixed 4096 x 4096 product would take minutes there."""
    import torch

    torch.set_num_threads(threads)
    dt = getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype])
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        a @ b
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        if best >= budget_s or n >= max_n:
            return 2 * n**3 / best
        n *= 2


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX or AVX512-BF16); without, bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def heldout_loss(model, tokenizer, eval_file: Path) -> float:
    """Mean CE over completion tokens of the held-out rows; the same code for every configuration."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    # bf16 autocast where the CPU has native bf16; elsewhere emulated bf16 would make this evaluation take longer
    # than the training it follows. The same choice for every configuration of a run.
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16()):
        for line in open(eval_file):
            r = json.loads(line)
            prompt = tokenizer.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
            full = tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=True,
                                                 return_dict=True)["input_ids"]
            ids = torch.tensor([full])
            logits = model(input_ids=ids).logits[0, :-1].float()
            target = ids[0, 1:].clone()
            target[: len(prompt) - 1] = -100
            total += float(F.cross_entropy(logits, target, ignore_index=-100, reduction="sum"))
            count += int((target != -100).sum())
    return total / max(count, 1)


def _high_water_mark_gib() -> float:
    """This process's peak resident memory so far (Linux VmHWM; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_recorder(tokenizer, eval_file: Path, out: dict):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Per-step losses, and the held-out loss once training ends."""

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                out.setdefault("losses", []).append(float(logs["loss"]))

        def on_train_end(self, args, state, control, model=None, **kw):
            out["train_peak_rss_gib"] = _high_water_mark_gib()
            out["heldout_loss"] = heldout_loss(model, tokenizer, eval_file)

    return Recorder()


def real_positions(batch):
    """Which positions hold a real token: a 0/1 or segment-numbered (LLaMA-Factory's neat packing) attention mask,
    a 4-D mask where a real position may attend to itself (LLaMA-Factory's neat packing on sdpa), or all of them
    (padding-free batches)."""
    import torch

    mask = batch.get("attention_mask")
    if mask is None:
        return torch.ones_like(batch["input_ids"], dtype=torch.bool)
    if mask.dim() == 2:
        return mask != 0
    diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return diagonal == 0 if mask.is_floating_point() else diagonal.bool()


class CountingWrapper:
    """Wraps a Trainer's collator to count non-pad tokens, trained tokens (label != -100, after the shift) and
    examples (rows, or sequence starts where a batch carries position_ids) of the batches actually fed."""

    def __init__(self, inner):
        self.inner, self.tokens, self.trained, self.examples = inner, 0, 0, 0

    def __call__(self, features):
        batch = self.inner(features)
        real = real_positions(batch)
        self.tokens += int(real.sum())
        self.trained += int((batch["labels"][:, 1:] != -100).sum())
        positions = batch.get("position_ids")
        starts = (positions == 0) & real if positions is not None and positions.shape == real.shape else None
        self.examples += int(starts.sum()) if starts is not None else int(real.shape[0])
        return batch


def run_trl(name: str, mode: str, a, train: Path, evals: Path, rec: dict) -> dict:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sftlab.models.bundled import bundled_model_dir

    model_dir = str(bundled_model_dir())
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = dict(output_dir=a.workdir + f"/{name}-{mode}", max_length=a.max_length, learning_rate=LR[mode],
              per_device_train_batch_size=a.batch, max_steps=a.steps, logging_steps=1, save_strategy="no",
              report_to="none", seed=0, use_cpu=True, lr_scheduler_type="cosine", warmup_steps=0,
              disable_tqdm=True, dataloader_pin_memory=False)
    if name == "trl_fastest":
        kw.update(bf16=True, packing=True, packing_strategy="bfd", padding_free=True, gradient_checkpointing=False,
                  per_device_train_batch_size=a.packed_batch)
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    ds = load_dataset("json", data_files=str(train), split="train")
    trainer = SFTTrainer(model=model_dir, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                         peft_config=peft_config, callbacks=[make_recorder(tok, evals, rec)])
    counter = CountingWrapper(trainer.data_collator)
    trainer.data_collator = counter
    result = trainer.train()
    return dict(runtime=result.metrics["train_runtime"], tokens=counter.tokens, trained=counter.trained,
                examples=counter.examples, bf16=bool(trainer.args.bf16),
                gradient_checkpointing=bool(trainer.args.gradient_checkpointing))


def run_sftlab(name: str, mode: str, a, train: Path, evals: Path, rec: dict) -> dict:
    from sftlab.config import parse_config
    from sftlab.models.bundled import bundled_model_dir
    from sftlab.models.load import load_tokenizer
    from sftlab.workflow import run_sft

    tok = load_tokenizer(str(bundled_model_dir()))
    over = dict(train_file=str(train), output_dir=a.workdir + f"/{name}-{mode}", cutoff_len=a.max_length,
                learning_rate=LR[mode], per_device_train_batch_size=a.batch, max_steps=a.steps, logging_steps=1,
                save_strategy="no", seed=0, lr_scheduler_type="cosine", warmup_steps=0, finetuning_type=mode,
                lora_rank=16, lora_alpha=32, plot_loss=False, overwrite_output_dir=True,
                data_cache_dir=a.workdir + "/cache")
    if name == "sftlab_packing":
        over.update(packing=True, per_device_train_batch_size=a.packed_batch)
    cfg = parse_config(shlex.split(a.sftlab_args), overrides=over)
    metrics = run_sft(cfg, callbacks=[make_recorder(tok, evals, rec)])
    return dict(runtime=metrics["train_runtime"], tokens=metrics["train_tokens"],
                trained=metrics["train_trained_tokens"], bf16=bool(cfg.training.bf16),
                gradient_checkpointing=bool(cfg.training.gradient_checkpointing))


# ---- LLaMA-Factory, in a virtual environment of its own -------------------------------------------------------
def ensure_llamafactory(venv: Path) -> Path:
    """Create (once) LLaMA-Factory's virtual environment with setup_llamafactory.sh; returns its CLI."""
    subprocess.run(["bash", str(BENCH_DIR / "setup_llamafactory.sh"), str(venv)], check=True)
    return venv / "bin" / "llamafactory-cli"


def write_llamafactory_data(workdir: Path, train: Path) -> Path:
    """The benchmark's training rows as a local LLaMA-Factory data set (sharegpt messages + dataset_info.json)."""
    data_dir = workdir / "llamafactory_data"
    data_dir.mkdir(exist_ok=True)
    with open(train) as src, open(data_dir / "train.jsonl", "w") as dst:
        for line in src:
            r = json.loads(line)
            dst.write(json.dumps({"messages": r["prompt"] + r["completion"]}) + "\n")
    info = {"sftlab_bench": {"file_name": "train.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                                      "assistant_tag": "assistant"}}}
    (data_dir / "dataset_info.json").write_text(json.dumps(info, indent=1))
    return data_dir


def llamafactory_config(name: str, mode: str, a, model_dir: str, data_dir: Path) -> dict:
    """LLaMA-Factory's fastest CPU set-up: neat packing (packed rows, block-diagonal attention), no gradient
    checkpointing (on by default there; memory is plentiful here, as for trl_fastest), bf16 or fp32."""
    cfg = dict(model_name_or_path=model_dir, stage="sft", do_train=True, finetuning_type=mode,
               dataset="sftlab_bench", dataset_dir=str(data_dir), template="smollm2", cutoff_len=a.max_length,
               packing=True, neat_packing=True, overwrite_cache=True, dataloader_num_workers=0,
               output_dir=f"{a.workdir}/{name}-{mode}", overwrite_output_dir=True, logging_steps=1,
               save_strategy="no", plot_loss=False, report_to="none", disable_tqdm=True,
               per_device_train_batch_size=a.packed_batch, gradient_accumulation_steps=1,
               learning_rate=LR[mode], max_steps=a.steps, lr_scheduler_type="cosine", warmup_steps=0, seed=0,
               bf16=name == "llamafactory_fastest", disable_gradient_checkpointing=True,
               dataloader_pin_memory=False, use_cpu=True)
    if mode == "lora":
        cfg.update(lora_rank=16, lora_alpha=32, lora_dropout=0.0, lora_target="all")
    return cfg


def run_llamafactory(name: str, mode: str, a, cli: Path) -> dict:
    """`llamafactory-cli train config.yaml` in LLaMA-Factory's environment, measured by llamafactory_probe/."""
    from sftlab.models.bundled import bundled_model_dir

    workdir = Path(a.workdir)
    model_dir = str(bundled_model_dir())
    data_dir = write_llamafactory_data(workdir, workdir / "train.jsonl")
    config = workdir / f"{name}-{mode}.yaml"
    config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in
                              llamafactory_config(name, mode, a, model_dir, data_dir).items()))
    result_file = workdir / f"{name}-{mode}.result.json"
    result_file.unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=str(BENCH_DIR / "llamafactory_probe"), SFTLAB_BENCH_DIR=str(BENCH_DIR),
               SFTLAB_BENCH_RESULT=str(result_file), SFTLAB_BENCH_MODEL=model_dir,
               SFTLAB_BENCH_EVAL=str(workdir / "eval.jsonl"), OMP_NUM_THREADS=str(a.threads),
               HF_HOME=str(workdir / "hf_home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               DISABLE_VERSION_CHECK="1")
    load0 = os.getloadavg()[0]
    try:
        proc = subprocess.run([str(cli), "train", str(config)], env=env, capture_output=True, text=True,
                              timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return unfinished(name, mode, a, load0)
    if proc.returncode != 0 or not result_file.exists():
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
        return unfinished(name, mode, a, load0, f"failed (exit {proc.returncode}; config {config})")
    rec = json.loads(result_file.read_text())
    return summarize(name, mode, rec, rec, load0)


def unfinished(name: str, mode: str, a, load0: float, why: str | None = None) -> dict:
    """The row of a configuration that failed, or did not finish within --timeout seconds (its process was
    killed); the other configurations still run."""
    why = why or f"did not finish within {a.timeout:.0f} s"
    print(f"[bench] {name}:{mode} {why}", flush=True)
    return dict(config=name, mode=mode, unfinished=why, load_before=load0, load_after=os.getloadavg()[0])


def summarize(name: str, mode: str, res: dict, rec: dict, load0: float) -> dict:
    """One configuration's row: the run's figures plus losses, memory and load, the same for every library."""
    losses = rec.get("losses", [])
    tail = losses[-max(1, len(losses) // 4):]
    res.update(config=name, mode=mode, train_peak_rss_gib=rec.get("train_peak_rss_gib"),
               final_train_loss=sum(tail) / max(len(tail), 1), heldout_loss=rec.get("heldout_loss"),
               steps=len(losses), load_before=load0, load_after=os.getloadavg()[0])
    return res


def run_one(a) -> None:
    """Child process: one configuration, results as JSON on the last stdout line."""
    import torch

    torch.set_num_threads(a.threads)
    name, mode = a.one.split(":")
    train, evals = Path(a.workdir) / "train.jsonl", Path(a.workdir) / "eval.jsonl"
    rec: dict = {}
    load0 = os.getloadavg()[0]
    res = (run_trl if name.startswith("trl") else run_sftlab)(name, mode, a, train, evals, rec)
    res["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(summarize(name, mode, res, rec, load0)), flush=True)


def run_child(name: str, mode: str, a, workdir: Path) -> dict:
    """A TRL or sftlab configuration in a subprocess of this environment (so peak RSS is its own)."""
    cmd = [sys.executable, __file__, "--one", f"{name}:{mode}", "--workdir", str(workdir),
           "--rows", str(a.rows), "--steps", str(a.steps), "--batch", str(a.batch),
           "--max-length", str(a.max_length), "--threads", str(a.threads), "--packed-batch", str(a.packed_batch),
           "--sftlab-args=" + a.sftlab_args]
    load0 = os.getloadavg()[0]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
    except subprocess.TimeoutExpired:
        return unfinished(name, mode, a, load0)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        return unfinished(name, mode, a, load0, f"failed (exit {proc.returncode})")
    return json.loads(line[len("RESULT "):])


# ---- report ---------------------------------------------------------------------------------------------------
def table(results: list[dict], peak: float) -> str:
    lines = []
    for mode in MODES:
        rows = [r for r in results if r["mode"] == mode]
        if not rows:
            continue
        done = [r for r in rows if "runtime" in r]
        refs = [(label, next((r for r in done if r["config"] == c), None))
                for label, c in (("TRL fastest", "trl_fastest"), ("LLaMA-Factory fastest", "llamafactory_fastest"))]
        refs = [(label, ref) for label, ref in refs if ref is not None]
        k = 6 if mode == "full" else 4
        vs = "".join(f" trained tok/s vs {label} | RSS vs {label} |" for label, _ in refs)
        lines += [f"\n**{mode.upper()}**\n",
                  f"| config | trained tok/s | non-pad tok/s |{vs} peak RSS training GiB | peak RSS process GiB "
                  "| train loss (last 25%) | held-out loss | MFU | wall s |",
                  "|---|" + "---:|" * (8 + 2 * len(refs))]
        for r in rows:
            if "runtime" not in r:
                lines.append(f"| {r['config']} | {r['unfinished']} |"
                             + " |" * (7 + 2 * len(refs)))
                continue
            tps, nps = r["trained"] / r["runtime"], r["tokens"] / r["runtime"]
            ratios = "".join(f" {tps / _tps(ref):.2f}x | {_train_rss(r) / _train_rss(ref):.2f}x |" for _, ref in refs)
            mfu = k * N_PARAMS * nps / peak
            lines.append(f"| {r['config']} | {_rate(tps)} | {_rate(nps)} |{ratios} {_train_rss(r):.2f} "
                         f"| {r['peak_rss_gib']:.2f} | {r['final_train_loss']:.4f} | {r['heldout_loss']:.4f} "
                         f"| {100 * mfu:.1f}% | {r['runtime']:.0f} |")
    return "\n".join(lines)


def _rate(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.2f}"


def _tps(r: dict) -> float:
    return r["trained"] / r["runtime"]


def _train_rss(r: dict) -> float:
    return r.get("train_peak_rss_gib") or r["peak_rss_gib"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=96, help="training examples (the data set is generated)")
    p.add_argument("--eval-rows", type=int, default=24)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: one epoch, rows/batch)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument("--out", default="benchmarks/results/throughput")
    p.add_argument("--workdir", default=None)
    p.add_argument("--sftlab-args", default="",
                   help="extra sftlab flags for the sftlab configurations, one string: "
                        "--sftlab-args='--max_tokens_per_forward 0'")
    p.add_argument("--llamafactory-venv", default=str(BENCH_DIR / ".venv-llamafactory"),
                   help="LLaMA-Factory's virtual environment, created by setup_llamafactory.sh when missing")
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds per configuration; one that runs longer is killed and reported as unfinished")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--packed-batch", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.threads is None:
        import psutil

        a.threads = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    a.steps = a.steps or max(1, a.rows // a.batch)
    if a.one:
        run_one(a)
        return

    from transformers import AutoTokenizer

    from sftlab.models.bundled import bundled_model_dir

    configs = a.configs.split(",")
    unknown = sorted(set(configs) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"[bench] unknown --configs {unknown}; known: {', '.join(CONFIGS)}")
    cli = ensure_llamafactory(Path(a.llamafactory_venv)) if set(configs) & set(LLAMAFACTORY) else None
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="sftlab-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    a.workdir = str(workdir)
    train, _ = write_data(workdir, a.rows, a.eval_rows, a.max_length)
    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    a.packed_batch = packed = packed_batch(train, tok, a.max_length, a.steps)
    peaks = {dt: matmul_peak(a.threads, dt) for dt in ("bf16", "fp32")}
    peak = max(peaks.values())  # the MFU denominator: the faster precision's matmul rate on this CPU
    load_start = os.getloadavg()
    print(f"[bench] {a.rows} rows, {a.steps} steps, batch {a.batch} (packed: {packed} rows of {a.max_length}), "
          f"{a.threads} threads, matmul peak bf16 {peaks['bf16'] / 1e12:.3f} / fp32 {peaks['fp32'] / 1e12:.3f} "
          f"TFLOP/s, load {load_start}", flush=True)
    results = []
    for mode in a.modes.split(","):
        for name in configs:
            t0 = time.time()
            r = run_llamafactory(name, mode, a, cli) if name in LLAMAFACTORY else run_child(name, mode, a, workdir)
            results.append(r)
            if "runtime" not in r:
                continue
            print(f"[bench] {name}:{mode}: {r['trained'] / r['runtime']:.0f} trained tok/s, "
                  f"{r['tokens'] / r['runtime']:.0f} non-pad tok/s, {r['peak_rss_gib']:.2f} GiB, "
                  f"held-out {r['heldout_loss']:.4f} ({time.time() - t0:.0f} s)", flush=True)
    lf = next((r for r in results if r["config"] in LLAMAFACTORY and "versions" in r), None)
    peers = f"TRL {_version('trl')}" + (f" and LLaMA-Factory {lf['versions']['llamafactory']}" if lf else "")
    md = (f"sftlab vs {peers} training throughput on the bundled SmolLM2-135M-Instruct "
          f"({_cpu_name()}, {a.threads} threads, torch {_version('torch')}, "
          f"transformers {_version('transformers')}{_llamafactory_stack(lf)}): {a.rows} generated mixed-length "
          f"examples, {a.steps} steps, batch {a.batch} examples (packed configs: {packed} rows of {a.max_length} "
          f"per step), max_length {a.max_length}, LoRA r=16 on all linear layers (lr {LR['lora']}) / full FT "
          f"(lr {LR['full']}), cosine schedule. Matmul peak measured: bf16 {peaks['bf16'] / 1e12:.3f}, fp32 "
          f"{peaks['fp32'] / 1e12:.3f} TFLOP/s (MFU against the larger). "
          f"Load average (1 min) at the start: {load_start[0]:.1f}; during the runs: "
          f"{min(r['load_before'] for r in results):.1f}-{max(r['load_after'] for r in results):.1f}.\n"
          + table(results, peak) + "\n" + peer_ratios(results))
    print(md)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(rows=a.rows, steps=a.steps, batch=a.batch, packed_batch=packed, max_length=a.max_length,
                threads=a.threads, bf16_peak_flops=peaks['bf16'],
                fp32_peak_flops=peaks['fp32'], n_params=N_PARAMS, cpu=_cpu_name(), load_start=load_start)
    out.with_suffix(".json").write_text(json.dumps({"settings": meta, "results": results}, indent=1))
    out.with_suffix(".md").write_text(md)


def peer_ratios(results: list[dict]) -> str:
    """sftlab's trained tokens/s and training RSS over each LLaMA-Factory row of the same mode."""
    lines = []
    for mode in MODES:
        done = [r for r in results if r["mode"] == mode and "runtime" in r]
        for lf in (r for r in done if r["config"] in LLAMAFACTORY):
            for ours in (r for r in done if r["config"].startswith("sftlab")):
                lines.append(f"* {mode}: {ours['config']} / {lf['config']}: {_tps(ours) / _tps(lf):.2f}x trained "
                             f"tok/s at {_train_rss(ours) / _train_rss(lf):.2f}x the training RSS")
    return ("\nsftlab against LLaMA-Factory (the aim: 2x its fastest configuration's trained tok/s):\n\n"
            + "\n".join(lines) + "\n") if lines else ""


def _llamafactory_stack(lf: dict | None) -> str:
    if lf is None:
        return ""
    v = lf["versions"]
    return (f"; LLaMA-Factory in its own environment: llamafactory {v['llamafactory']}, torch {v['torch']}, "
            f"transformers {v['transformers']}, peft {v['peft']}")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(ln for ln in f if ln.startswith("flags")).split())
    except (OSError, StopIteration):
        return name
    isa = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags] or ["avx2" if "avx2" in flags else "-"]
    return f"{name}, {'/'.join(isa)}"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    main()
