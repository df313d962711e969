"""Generation throughput on the bundled SmolLM2-135M-Instruct: one prompt at a time vs `generate_batched` (batch 16).

32 chat prompts rendered with the tokenizer's own chat template, greedy, max_new_tokens 64, stopping at the
template's end-of-turn token. Both modes run through `generate_batched` (batch_size 1 vs 16) in the same process,
with bf16 autocast off and (unless --no-bf16) on. Tokens/s counts tokens the model produced (up to and including
each row's stop token), so the two modes are compared on the same work. Also reports how many prompts got
identical text in both modes (padding changes float rounding a little, which can flip a near-tied greedy choice).

    python benchmarks/generation.py [--device cpu|cuda] [--no-bf16] [--threads N] [--prompts N]
                                    [--max-new-tokens N] [--out benchmarks/results/generation.json]

On CPU the default is ONE torch thread: on a machine shared with other jobs, OpenMP threads that wait for each
other are starved and a 2-thread decode step measured ~9x slower than a 1-thread one (13.1 s vs 1.4 s for 16
tokens on a loaded 2-core box). Pass --threads 0 to keep torch's default.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from sftlab.config import GeneratingArguments
from sftlab.eval.generate import generate_batched
from sftlab.models.bundled import bundled_model_dir

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about autumn leaves.",
    "How many legs does a spider have?",
    "What does HTTP stand for?",
    "Give me three tips for better sleep.",
    "Who wrote Romeo and Juliet?",
    "What is 17 times 23?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "List the planets of the solar system in order from the sun.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of Cinderella in two sentences.",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Suggest a name for a friendly golden retriever.",
    "What causes the seasons on Earth?",
    "How do I reverse a string in JavaScript?",
    "What is the largest ocean on Earth?",
    "Describe the taste of a lemon to someone who has never had one.",
    "What year did the first human land on the Moon?",
    "Give an example of a prime number greater than 50.",
    "What is machine learning?",
    "Write a short polite email declining a meeting invitation.",
    "What are the three primary colors?",
    "How does a bicycle stay upright while moving?",
    "Name a famous painting by Leonardo da Vinci.",
    "What is the chemical symbol for gold?",
    "Why do we have leap years?",
    "Recommend a healthy breakfast.",
    "What is the square root of 144?",
    "Explain what a black hole is to a ten-year-old.",
    "What language is spoken in Brazil?",
]


def render_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for q in QUESTIONS:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def run_mode(model, tokenizer, prompts, args, stops, batch_size: int, bf16: bool, device: str):
    ctx = torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        return generate_batched(model, tokenizer, prompts, args, stops, batch_size=batch_size)


def _stats(result) -> dict:
    return dict(new_tokens=result.new_tokens, seconds=result.seconds, tokens_per_second=result.tokens_per_second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast runs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--prompts", type=int, default=len(QUESTIONS), help="use the first N questions")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "generation.json"))
    opts = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if opts.device == "cpu" and opts.threads > 0:
        torch.set_num_threads(opts.threads)

    model_dir = bundled_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(opts.device)
    prompts = render_prompts(tokenizer)[: opts.prompts]
    stops = [tokenizer.eos_token_id]  # <|im_end|>: the chat template's end of turn
    args = GeneratingArguments(max_new_tokens=opts.max_new_tokens)

    # Warm-up (allocator, kernels) so the first measured mode is not penalised.
    generate_batched(model, tokenizer, prompts[:2], GeneratingArguments(max_new_tokens=4), stops, batch_size=2)

    rows = []
    for bf16 in [False] if opts.no_bf16 else [False, True]:
        seq = run_mode(model, tokenizer, prompts, args, stops, 1, bf16, opts.device)
        bat = run_mode(model, tokenizer, prompts, args, stops, opts.batch_size, bf16, opts.device)
        same = sum(a == b for a, b in zip(seq.texts, bat.texts))
        rows.append(
            dict(
                bf16_autocast=bf16,
                sequential=_stats(seq),
                batched=_stats(bat),
                speedup=bat.tokens_per_second / seq.tokens_per_second,
                identical_outputs=same,
                example=dict(question=QUESTIONS[0], sequential=seq.texts[0], batched=bat.texts[0]),
            )
        )

    header = f"{'autocast':<9} {'mode':<12} {'tokens':>7} {'seconds':>8} {'tok/s':>8}"
    print(f"device={opts.device} threads={torch.get_num_threads()} prompts={len(prompts)} "
          f"max_new_tokens={opts.max_new_tokens} greedy")
    print(header)
    print("-" * len(header))
    for r in rows:
        tag = "bf16" if r["bf16_autocast"] else "fp32"
        for mode, label in (("sequential", "batch 1"), ("batched", f"batch {opts.batch_size}")):
            m = r[mode]
            print(f"{tag:<9} {label:<12} {m['new_tokens']:>7} {m['seconds']:>8.2f} {m['tokens_per_second']:>8.1f}")
        print(f"{tag:<9} speedup batched/sequential = {r['speedup']:.2f}x; "
              f"identical outputs {r['identical_outputs']}/{len(prompts)}")

    result = dict(
        model=str(model_dir),
        device=opts.device,
        device_name=(
            torch.cuda.get_device_name() if opts.device == "cuda" else platform.processor() or platform.machine()
        ),
        torch_threads=torch.get_num_threads(),
        prompts=len(prompts),
        max_new_tokens=opts.max_new_tokens,
        batch_size=opts.batch_size,
        runs=rows,
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
    )
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
