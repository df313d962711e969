"""GGUF export of a trained model: file size per type, and how often llama.cpp's greedy tokens agree with f16.

Trains the bundled SmolLM2-135M-Instruct for a few LoRA steps on the demo data (or takes --model OUTPUT_DIR),
exports f16, q8_0 and q4_k_m with `sftlab export --format gguf`, and generates greedily in llama.cpp for the demo's
held-out questions (prompts from the GGUF's own chat template). Reported per type: file size, prompts whose tokens
equal f16's, and the mean share of f16's tokens matched before the first difference; for f16 also the agreement
with sftlab's own greedy `predict` tokens.

    python benchmarks/gguf_quantization.py [--model OUTPUT_DIR] [--max-new-tokens 48] [--out results/gguf.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train_briefly(out: Path) -> Path:
    from tests.export.test_llama_cpp import train_smollm_lora

    return train_smollm_lora(out / "lora")


def shared_prefix(a: list[int], b: list[int]) -> float:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(b), 1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/gguf.json"))
    args = ap.parse_args()

    from sftlab.data.templates import Message
    from tests.export.test_llama_cpp import client_greedy, client_prompt_ids, export, open_gguf, sftlab_greedy

    work = Path(tempfile.mkdtemp(prefix="sftlab-gguf-bench-"))
    model = Path(args.model) if args.model else train_briefly(work)
    questions = [json.loads(line)["instruction"] for line in open(REPO / "examples/demo/test.jsonl")]
    conversations = [[Message("user", q)] for q in questions]
    _, res, _, _, _ = sftlab_greedy(str(model), conversations, args.max_new_tokens)
    rows, f16_tokens = [], None
    for q in ("f16", "q8_0", "q4_k_m"):
        path = export(model, work / f"model-{q}.gguf", "--quantization", q)
        llm = open_gguf(path)
        tokens = [client_greedy(llm, client_prompt_ids(llm, c), args.max_new_tokens)[0] for c in conversations]
        ref = res.sequences if q == "f16" else f16_tokens
        rows.append(dict(
            type=q, size_mib=round(path.stat().st_size / 2**20, 1),
            against="sftlab predict (fp32)" if q == "f16" else "llama.cpp f16",
            identical=sum(a == b for a, b in zip(tokens, ref)), prompts=len(tokens),
            mean_shared_prefix=round(sum(shared_prefix(a, b) for a, b in zip(tokens, ref)) / len(tokens), 3),
        ))
        f16_tokens = tokens if q == "f16" else f16_tokens
        print(rows[-1], flush=True)
    result = dict(model=str(model), max_new_tokens=args.max_new_tokens, load_average=os.getloadavg(), rows=rows)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
