"""The GPU check: one command for a 1-GPU CUDA machine, under 8 minutes, one JSON file.

    python benchmarks/gpu_check.py                      # on the GPU machine -> benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry-run --out X    # the same code on CPU with tiny sizes (part of the tests)

1. Correctness on the GPU, with sdpa and (when ``flash_attn`` imports) flash-attention varlen:
   * packed vs unpacked: the summed SFT loss over the same examples, padded one per row vs BFD-packed rows;
   * batch x accumulation invariance: ``sftlab train`` (full FT, SGD, fp32) with 4x1, 2x2 and 1x4 rows x
     accumulation steps gives the same weight update;
   * bf16 autocast loss within 1% of the fp32 loss.
2. Throughput and peak GPU memory, side by side, of sftlab's default LoRA (r16, all linear layers) and full
   fine-tuning against TRL's fastest configuration (bf16, BFD packing + padding-free, no gradient checkpointing) and
   TRL with Liger kernels when ``liger_kernel`` imports, on the bundled SmolLM2-135M and a randomly initialised
   ~1B-parameter Llama-shaped model, at sequence lengths 512 and 4096. Each library and model runs in its own
   process; the peak is ``torch.cuda.max_memory_allocated`` per configuration.
3. MFU: model FLOPs per second against the GPU's dense bf16 peak (from its name, else a measured matmul).
   FLOPs per token = k x (matmul parameters) + 3 x 4 x layers x hidden x (mean context / 2), with k = 6 for full
   fine-tuning and 4 for LoRA (no weight gradients of frozen weights); the attention term is the causal QK^T and
   PV products forward and backward.

A part that would push the run past ``--budget-s`` is skipped and listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAKS = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("GH200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12),
              ("B200", 2250e12))
LR = {"lora": 2e-4, "full": 2e-5}
WORDS = ("the of and to in is that it was for on are as with his they at be this from have or by one had not but "
         "what all were when we there can an your which their said if do will each about how up out them then she "
         "many some so these would other into has more her two like him see time could no make than first been "
         "model training data token gradient batch loss layer attention matrix vector python function").split()


# ---- sizes ------------------------------------------------------------------------------------------------------
def plan(dry_run: bool) -> dict:
    """Everything that differs between the GPU run and the CPU dry run: sizes only, never code paths."""
    if dry_run:
        return dict(device="cpu", seqs=[64], rows_per_step={64: 2}, warmup=1, timed=1,
                    models={"tiny-random": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2)},
                    check_model="tiny-random", check_seq=64)
    return dict(device="cuda", seqs=[512, 4096], rows_per_step={512: 16, 4096: 2}, warmup=2, timed=5,
                models={"smollm2-135m": None,
                        "llama-1b-random": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                                                num_attention_heads=32, num_key_value_heads=8)},
                check_model="smollm2-135m", check_seq=512)


def model_dir(name: str, shape: dict | None, workdir: Path, device: str) -> str:
    """The bundled model, or a random Llama of ``shape`` (with the bundled tokenizer) saved once under workdir."""
    from sftlab.models.bundled import bundled_model_dir

    bundled = str(bundled_model_dir())
    if shape is None:
        return bundled
    out = workdir / name
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(bundled)
    config = LlamaConfig(vocab_size=len(tok), max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_rows(path: Path, tokenizer, n: int, seq: int, seed: int) -> Path:
    """Conversational prompt/completion rows of seq/3 .. 0.9 seq tokens each (chat template included)."""
    rng = random.Random(seed)
    with open(path, "w") as fh:
        made = 0
        while made < n:
            words = rng.randint(max(4, seq // 3), max(5, int(seq * 0.9)))
            split = rng.randint(words // 4, 3 * words // 4)
            text = [rng.choice(WORDS) for _ in range(words)]
            msgs = [{"role": "user", "content": " ".join(text[:split])},
                    {"role": "assistant", "content": " ".join(text[split:])}]
            ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
            if len(ids) > seq - 4:
                continue
            fh.write(json.dumps({"prompt": msgs[:1], "completion": msgs[1:]}) + "\n")
            made += 1
    return path


# ---- 1. correctness -------------------------------------------------------------------------------------------
def attention_kinds(device: str) -> list[str]:
    kinds = ["sdpa"]
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            kinds.append("flash_attention_2")
        except ImportError:
            pass
    return kinds


def random_examples(vocab: int, n: int, seq: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(seq // 8, seq // 2)
        ids = [rng.randrange(3, vocab) for _ in range(length)]
        prompt = length // 3
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def batch_loss(model, batch: dict, device: str, autocast: bool) -> tuple[float, int]:
    import torch

    from sftlab.train.loss import compute_sft_loss

    batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        parts = compute_sft_loss(model, batch)
    return float(parts.loss_sum), int(parts.n_tokens)


def check_packing_and_bf16(path: str, attn: str, device: str, seq: int) -> dict:
    """Packed vs unpacked summed loss (fp32 where the kernel allows it) and bf16 autocast vs fp32 loss."""
    import torch
    from transformers import AutoModelForCausalLM

    from sftlab.data.collator import SFTCollator, mask_mode_for_attention
    from sftlab.data.packing import pack_examples

    flash = "flash" in attn
    dtype = torch.bfloat16 if flash else torch.float32  # flash-attention has no fp32 kernel
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn, dtype=dtype).to(device).eval()
    examples = random_examples(model.config.vocab_size, 12, seq, seed=1)
    collate = SFTCollator(pad_token_id=0, mask_mode=mask_mode_for_attention(attn))
    unpacked_sum, n = batch_loss(model, collate(examples), device, autocast=False)
    packed_sum, n_packed = batch_loss(model, collate(pack_examples(examples, seq)), device, autocast=False)
    result = dict(attention=attn, dtype=str(dtype).replace("torch.", ""), trained_tokens=n,
                  unpacked_loss=unpacked_sum / n, packed_loss=packed_sum / max(n_packed, 1),
                  packed_vs_unpacked_rel_diff=abs(packed_sum - unpacked_sum) / abs(unpacked_sum))
    tolerance = 2e-3 if flash else 1e-4
    result["packed_ok"] = n_packed == n and result["packed_vs_unpacked_rel_diff"] < tolerance
    if not flash:
        bf16_sum, _ = batch_loss(model, collate(examples), device, autocast=True)
        result.update(bf16_loss=bf16_sum / n, bf16_vs_fp32_rel_diff=abs(bf16_sum - unpacked_sum) / abs(unpacked_sum))
        result["bf16_ok"] = result["bf16_vs_fp32_rel_diff"] < 1e-2
    del model
    return result


def check_batch_accumulation(path: str, workdir: Path, device: str, seq: int) -> dict:
    """`sftlab train`, full FT with SGD in fp32, 2 optimizer steps of 4 rows as 4x1, 2x2, 1x4: the weight updates
    agree (SGD keeps them proportional to the gradients, so a wrong scaling would show at once)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from sftlab.config import parse_config
    from sftlab.workflow import run_sft

    data = write_rows(workdir / f"accum-{seq}.jsonl", AutoTokenizer.from_pretrained(path), 8, seq, seed=3)
    finals = {}
    for bs, ga in ((4, 1), (2, 2), (1, 4)):
        out = workdir / f"accum-{bs}x{ga}"
        over = dict(model_name_or_path=path, train_file=str(data), output_dir=str(out), cutoff_len=seq,
                    per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=2, optim="sgd",
                    learning_rate=1e-2, lr_scheduler_type="constant", warmup_steps=0, bf16=False,
                    finetuning_type="full", save_strategy="no", plot_loss=False, overwrite_output_dir=True,
                    logging_steps=1, seed=0, data_cache_dir=str(workdir / "cache"), use_cpu=device == "cpu")
        run_sft(parse_config([], overrides=over))
        finals[f"{bs}x{ga}"] = load_file(str(out / "model.safetensors"))
        gc.collect()
    start = load_file(str(Path(path) / "model.safetensors")) if (Path(path) / "model.safetensors").is_file() else None
    ref = finals["4x1"]
    result = {}
    for name, weights in finals.items():
        if name == "4x1":
            continue
        diff = max(float((weights[k].double() - ref[k].double()).abs().max()) for k in ref)
        result[f"{name}_vs_4x1_max_abs_weight_diff"] = diff
    if start is not None:
        moved = max(float((ref[k].double() - start[k].double()).abs().max()) for k in ref if k in start)
        result["max_abs_update"] = moved
    scale = result.get("max_abs_update") or 1.0
    result["ok"] = all(v <= 1e-3 * scale for k, v in result.items() if k.endswith("weight_diff"))
    return result


def run_correctness(a, p: dict, workdir: Path) -> list[dict]:
    path = model_dir(p["check_model"], p["models"][p["check_model"]], workdir, p["device"])
    out = [dict(check="packing_and_bf16", model=p["check_model"], seq=p["check_seq"],
                **check_packing_and_bf16(path, attn, p["device"], p["check_seq"]))
           for attn in attention_kinds(p["device"])]
    out.append(dict(check="batch_x_accumulation", model=p["check_model"], seq=p["check_seq"],
                    **check_batch_accumulation(path, workdir, p["device"], p["check_seq"])))
    return out


# ---- 2. throughput --------------------------------------------------------------------------------------------
class StepClock:
    """Seconds and tokens of the timed optimizer steps (after the warm-up); tokens come from ``counter``."""

    def __init__(self, warmup: int, counter):
        self.warmup, self.counter = warmup, counter
        self.t0 = self.tokens0 = None
        self.seconds = 0.0
        self.tokens = self.steps = 0

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                _sync()
                now, tokens = time.perf_counter(), clock.counter()
                if state.global_step > clock.warmup:
                    clock.seconds += now - clock.t0
                    clock.tokens += tokens - clock.tokens0
                    clock.steps += 1
                clock.t0, clock.tokens0 = now, tokens

        return Clock()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _reset_peak() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def train_sftlab(path: str, data: Path, mode: str, seq: int, rows: int, steps: int, clock_warmup: int,
                 workdir: Path, device: str) -> dict:
    from sftlab.config import parse_config
    from sftlab.train import trainer as sftlab_trainer
    from sftlab.workflow import run_sft

    counted = [0]
    inner = sftlab_trainer.CountingCollator.__call__

    def counting(self, features):
        counted[0] += sum(len(f["input_ids"]) for f in features)
        return inner(self, features)

    sftlab_trainer.CountingCollator.__call__ = counting
    clock = StepClock(clock_warmup, lambda: counted[0])
    over = dict(model_name_or_path=path, train_file=str(data), output_dir=str(workdir / f"sftlab-{mode}-{seq}"),
                cutoff_len=seq, per_device_train_batch_size=rows, max_steps=steps, learning_rate=LR[mode],
                finetuning_type=mode, lora_rank=16, lora_alpha=32, save_strategy="no", plot_loss=False,
                overwrite_output_dir=True, logging_steps=1, seed=0, data_cache_dir=str(workdir / "cache"),
                use_cpu=device == "cpu")
    try:
        run_sft(parse_config([], overrides=over), callbacks=[clock.callback()])
    finally:
        sftlab_trainer.CountingCollator.__call__ = inner
    return dict(seconds=clock.seconds, tokens=clock.tokens, timed_steps=clock.steps)


def train_trl(path: str, data: Path, mode: str, seq: int, rows: int, steps: int, clock_warmup: int,
              workdir: Path, device: str, liger: bool) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    attn = "flash_attention_2" if "flash_attention_2" in attention_kinds(device) else "sdpa"
    tok = AutoTokenizer.from_pretrained(path)
    # Packed rows of `seq` tokens per step carrying about the tokens of `rows` unpacked examples (write_rows: a
    # mean length of about 0.6 seq).
    packed_rows = max(1, round(rows * 0.6))
    kw = dict(output_dir=str(workdir / f"trl-{mode}-{seq}"), max_length=seq, learning_rate=LR[mode],
              per_device_train_batch_size=packed_rows, max_steps=steps, logging_steps=1, save_strategy="no",
              report_to="none", seed=0, use_cpu=device == "cpu", disable_tqdm=True, bf16=True, packing=True,
              packing_strategy="bfd", padding_free=True, gradient_checkpointing=False, dataloader_pin_memory=False,
              model_init_kwargs={"attn_implementation": attn, "dtype": torch.float32})
    if liger:
        kw["use_liger_kernel"] = True
    peft_config = (LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                              task_type="CAUSAL_LM") if mode == "lora" else None)
    ds = load_dataset("json", data_files=str(data), split="train")
    trainer = SFTTrainer(model=path, args=SFTConfig(**kw), train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    counted = [0]
    inner = trainer.data_collator

    def counting(features):
        batch = inner(features)
        mask = batch.get("attention_mask")
        counted[0] += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    clock = StepClock(clock_warmup, lambda: counted[0])
    trainer.add_callback(clock.callback())
    trainer.train()
    del trainer
    return dict(seconds=clock.seconds, tokens=clock.tokens, timed_steps=clock.steps, attention=attn)


def flops_per_token(path: str, mode: str, seq_mean: float) -> float:
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(path)
    h, layers, inter, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    matmul_params = layers * (2 * h * h + 2 * h * kv + 3 * h * inter) + vocab * h
    k = 6 if mode == "full" else 4
    return k * matmul_params + 3 * 4 * layers * h * seq_mean / 2


def run_library(a, p: dict, workdir: Path) -> list[dict]:
    """Child process: one library on one model, every sequence length and mode."""
    from transformers import AutoTokenizer

    library, model_name = a.library, a.model
    path = model_dir(model_name, p["models"][model_name], workdir, p["device"])
    tok = AutoTokenizer.from_pretrained(path)
    steps = p["warmup"] + p["timed"]
    results = []
    for seq in p["seqs"]:
        rows = p["rows_per_step"][seq]
        data = workdir / f"rows-{seq}.jsonl"
        if not data.is_file():
            write_rows(data, tok, rows * steps * 2, seq, seed=seq)
        lengths = [len(tok.apply_chat_template(json.loads(l)["prompt"] + json.loads(l)["completion"],
                                               tokenize=True, return_dict=True)["input_ids"]) for l in open(data)]
        for mode in ("lora", "full"):
            _reset_peak()
            t0 = time.time()
            if library == "sftlab":
                r = train_sftlab(path, data, mode, seq, rows, steps, p["warmup"], workdir, p["device"])
            else:
                r = train_trl(path, data, mode, seq, rows, steps, p["warmup"], workdir, p["device"],
                              liger=library == "trl_liger")
            tps = r["tokens"] / max(r["seconds"], 1e-9)
            r.update(library=library, model=model_name, seq=seq, mode=mode, tokens_per_second=tps,
                     peak_gpu_gib=_peak_gib(), wall_s=time.time() - t0,
                     flops_per_token=flops_per_token(path, mode, sum(lengths) / len(lengths)))
            r["model_flops_per_second"] = r["flops_per_token"] * tps
            results.append(r)
            print(f"[gpu_check] {library} {model_name} seq {seq} {mode}: {tps:.0f} tok/s, peak "
                  f"{r['peak_gpu_gib'] if r['peak_gpu_gib'] is not None else float('nan'):.2f} GiB", flush=True)
            _reset_peak()
    return results


# ---- 3. peak and report ---------------------------------------------------------------------------------------
def bf16_peak(device: str) -> dict:
    import torch

    n = 8192 if device == "cuda" else 1024
    a_ = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b_ = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    a_ @ b_
    best = float("inf")
    for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        a_ @ b_
        _sync()
        best = min(best, time.perf_counter() - t0)
    measured = 2 * n**3 / best
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    listed = next((v for k, v in BF16_PEAKS if k in name), None) if device == "cuda" else None
    return dict(device_name=name, measured_bf16_matmul_flops=measured, listed_bf16_peak_flops=listed,
                peak_used=listed or measured)


def libraries(device: str) -> list[str]:
    libs = ["sftlab", "trl"]
    try:
        import liger_kernel  # noqa: F401

        if device == "cuda":
            libs.append("trl_liger")
    except ImportError:
        pass
    return libs


def child(a, part: str, workdir: Path, extra: list[str], timeout: float) -> tuple[list[dict] | None, str | None]:
    """One part in a process of its own (so each configuration's GPU memory peak is its own). The dry run calls
    the same functions in this process: on CPU there is no GPU peak to keep apart, and process start-ups are most
    of a tiny run's time."""
    if a.dry_run:
        return run_part(ap_parse(["--part", part, "--workdir", str(workdir), "--dry-run", *extra]), workdir), None
    cmd = [sys.executable, __file__, "--part", part, "--workdir", str(workdir), *extra]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return None, f"{part} {' '.join(extra)}: over the time budget"
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return None, f"{part} {' '.join(extra)}: failed (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(line[len("RESULT "):]), None


def summary(report: dict) -> str:
    peak = report["peak"]["peak_used"]
    lines = [f"GPU check on {report['peak']['device_name']} (bf16 peak used for MFU: {peak / 1e12:.0f} TFLOP/s)",
             "| model | seq | mode | library | tokens/s | vs TRL | peak GiB | MFU |", "|---|---:|---|---|---:|---:|---:|---:|"]
    rows = report["throughput"]
    for r in rows:
        trl = next((x for x in rows if x["library"] == "trl" and x["model"] == r["model"] and x["seq"] == r["seq"]
                    and x["mode"] == r["mode"]), None)
        ratio = f"{r['tokens_per_second'] / trl['tokens_per_second']:.2f}x" if trl and trl["tokens_per_second"] else "-"
        mem = f"{r['peak_gpu_gib']:.2f}" if r["peak_gpu_gib"] is not None else "-"
        lines.append(f"| {r['model']} | {r['seq']} | {r['mode']} | {r['library']} | {r['tokens_per_second']:.0f} "
                     f"| {ratio} | {mem} | {100 * r['model_flops_per_second'] / peak:.1f}% |")
    for c in report["correctness"]:
        lines.append("correctness: " + json.dumps(c))
    return "\n".join(lines)


def run_part(a, workdir: Path) -> list[dict]:
    p = plan(a.dry_run)
    return run_correctness(a, p, workdir) if a.part == "correctness" else run_library(a, p, workdir)


def ap_parse(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that this script still runs")
    ap.add_argument("--out", default="benchmarks/results/gpu_check.json")
    ap.add_argument("--budget-s", type=float, default=450.0, help="skip parts that would end past this")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--library", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = ap_parse(argv)
    p = plan(a.dry_run)
    workdir = Path(a.workdir or tempfile.mkdtemp(prefix="sftlab-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if a.dry_run:
        import torch

        torch.set_num_threads(1)  # the test suite's machine is small and shared
    if a.part:  # a child process
        print("RESULT " + json.dumps(run_part(a, workdir)), flush=True)
        return 0

    import torch

    if not a.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --dry-run to check the script on CPU")
    started = time.time()
    left = lambda: a.budget_s - (time.time() - started)  # noqa: E731
    report = dict(dry_run=a.dry_run, torch=torch.__version__, peak=bf16_peak(p["device"]), correctness=[],
                  throughput=[], skipped=[])
    t0 = time.time()
    res, err = child(a, "correctness", workdir, [], left())
    report["correctness"] = res or []
    report["part_seconds"] = {"correctness": time.time() - t0}
    if err:
        report["skipped"].append(err)
    for model_name in p["models"]:
        for library in libraries(p["device"]):
            t0 = time.time()
            res, err = child(a, "throughput", workdir, ["--library", library, "--model", model_name], left())
            report["part_seconds"][f"{library}/{model_name}"] = time.time() - t0
            report["throughput"] += res or []
            if err:
                report["skipped"].append(err)
    report["elapsed_s"] = time.time() - started
    report["ok"] = all(c.get("ok", True) and c.get("packed_ok", True) and c.get("bf16_ok", True)
                       for c in report["correctness"]) and not report["skipped"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(summary(report))
    print(f"[gpu_check] {'OK' if report['ok'] else 'PROBLEMS'} in {report['elapsed_s']:.0f} s -> {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
