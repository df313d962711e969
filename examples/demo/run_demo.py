"""`make demo`: show the held-out prompts answered by the base model, fine-tune, then show them again."""

from __future__ import annotations

import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIG = os.path.join(HERE, "demo.yaml")


def base_answers(cfg) -> list[tuple[str, str]]:
    from sftlab.data.dataset import prediction_items
    from sftlab.data.tokenize import stop_token_ids
    from sftlab.eval.generate import generate_batched
    from sftlab.models.load import load_model, load_tokenizer, resolve_model_path
    from sftlab.data.templates import resolve_template
    from sftlab.data.splits import encode_settings

    path = resolve_model_path(cfg.model.model_name_or_path)
    tok = load_tokenizer(path)
    template = resolve_template(cfg, tok, path)
    items = prediction_items(cfg.data.test_file, tok, template, encode_settings(cfg))
    model, _ = load_model(cfg.model, None, for_training=False)
    res = generate_batched(model, tok, [it.prompt_ids for it in items], cfg.generating,
                           stop_token_ids(tok, template), batch_size=8)
    return [(it.messages[-1].content, text) for it, text in zip(items, res.texts)]


def main() -> int:
    from sftlab.logs import prepare_process

    prepare_process()  # offline, and the libraries' progress bars and notices hidden (shown with --verbose)
    from sftlab.config import parse_config
    from sftlab.workflow import run_sft

    cfg = parse_config([CONFIG] + sys.argv[1:])
    print("== sftlab demo: LoRA fine-tuning of the bundled SmolLM2-135M-Instruct to answer in one-line JSON ==")
    before = base_answers(cfg)
    t0 = time.time()
    run_sft(cfg)
    minutes = (time.time() - t0) / 60
    out = cfg.training.output_dir
    after = [json.loads(l) for l in open(os.path.join(out, "generated_predictions.jsonl"), encoding="utf-8")]
    print(f"\n== held-out prompts, before and after fine-tuning ({minutes:.1f} min of training + evaluation) ==")
    for (question, b), a in zip(before, after):
        print(f"\nQ: {question}\n  before: {b[:160]!r}\n  after:  {a['predict'][:160]!r}\n  wanted: {a['label']!r}")
    results = json.load(open(os.path.join(out, "predict_results.json")))
    print("\nprediction scores after fine-tuning: " + ", ".join(
        f"{k} {v:.1f}" for k, v in results.items() if k.split("_", 1)[1] in ("rouge-l", "bleu-4", "exact_match", "f1")))
    print(f"\nOutputs in {out}/: adapter_model.safetensors, train_results.json, eval_results.json, "
          "trainer_log.jsonl, training_loss.png, generated_predictions.jsonl, predict_results.json, README.md")
    print(f"Chat with it: .venv/bin/sftlab chat --model {out}")
    show_gguf_answer(cfg, before[0][0], after[0]["predict"])
    return 0


def show_gguf_answer(cfg, question: str, sftlab_answer: str) -> None:
    """Export the result to GGUF (f16, template in the metadata) and ask llama.cpp the first held-out question."""
    from sftlab.cli import main as sftlab_main

    out = cfg.training.output_dir
    path = os.path.join(out, "demo-f16.gguf")
    print("\n== export to GGUF for llama.cpp / Ollama ==")
    if sftlab_main(["export", "--model", out, "--format", "gguf", "--out", path]) != 0:
        return
    try:
        from llama_cpp import Llama
    except ImportError:
        print("llama-cpp-python is not installed (make install builds it); skipping the llama.cpp answer")
        return
    llm = Llama(model_path=path, n_ctx=1024, n_threads=os.cpu_count(), verbose=False)
    reply = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0,
                                       repeat_penalty=1.0, max_tokens=cfg.generating.max_new_tokens)
    text = reply["choices"][0]["message"]["content"].strip()
    print(f"\nQ: {question}\n  sftlab:    {sftlab_answer[:160]!r}\n  llama.cpp: {text[:160]!r}"
          f"  ({'same' if text == sftlab_answer else 'different'}; the chat template came from the GGUF)")


if __name__ == "__main__":
    raise SystemExit(main())
