"""`make demo-rqa`: retrieval QA end to end on the fictional Marrowind Archipelago collection.

Indexes examples/rqa/documents.jsonl, scores the bundled SmolLM2-135M-Instruct end to end on the held-out test
questions (retrieve the top 4 passages, answer greedily), fine-tunes it with LoRA on train_w_qa.jsonl with
retrieved passages in the prompt (gold passage guaranteed), then scores it again. Extra `--key value` flags
override the settings below, e.g. `--num_train_epochs 2`.
"""

from __future__ import annotations

import json
import os
import sys
import time

# On a small CPU shared with other work, spinning OpenMP threads stall each other (decoding measured >10x slower
# on 2 busy cores); passive waiting costs nothing when the machine is idle.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = "saves/demo-rqa"

SETTINGS = {
    "model_name_or_path": "smollm2-135m-instruct",
    "finetuning_type": "lora",
    "lora_rank": 16,
    "lora_target": "all",
    "train_file": os.path.join(HERE, "train_w_qa.jsonl"),
    "eval_file": os.path.join(HERE, "eval_w_qa.jsonl"),
    "test_file": os.path.join(HERE, "test_w_qa.jsonl"),
    "full_dataset_file_path": os.path.join(HERE, "documents.jsonl"),
    "full_dataset_index_path": os.path.join(OUT, "index"),
    "rqa_context": "retrieved",  # train on the kind of prompt the model answers at test time
    "retrieval_top_k": 4,
    "e2e_max_questions": 10,  # per in-training evaluation; the final test evaluation uses all 40 questions
    "cutoff_len": 512,
    "output_dir": OUT,
    "overwrite_output_dir": True,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 16,
    "num_train_epochs": 1,
    "learning_rate": 5.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "logging_steps": 5,
    "eval_strategy": "no",  # one evaluation after training (eval loss + end to end on 10 eval questions)
    "save_strategy": "no",
    "do_train": True,
    "do_eval": True,
    "max_new_tokens": 48,
}


def evaluate_base(cfg):
    """End-to-end scores of the model before fine-tuning, through the same evaluator training uses."""
    from sftlab.models.load import load_model, load_tokenizer, resolve_model_path
    from sftlab.rqa.e2e import E2EEvaluator, load_e2e_rows, open_rqa_retriever
    from sftlab.data.templates import resolve_template

    path = resolve_model_path(cfg.model.model_name_or_path)
    tokenizer = load_tokenizer(path)
    template = resolve_template(cfg, tokenizer, path)
    retriever = open_rqa_retriever(cfg, tokenizer)
    model, _ = load_model(cfg.model, None, for_training=False)
    rows = load_e2e_rows(cfg.data.test_file, cfg)
    return E2EEvaluator(cfg, tokenizer, template, retriever).evaluate(model, rows)


def main() -> int:
    import yaml

    from sftlab.config import build_config, parse_argv
    from sftlab.logs import prepare_process

    prepare_process()  # offline, and the libraries' progress bars and notices hidden
    from sftlab.rqa.e2e import format_metrics
    from sftlab.workflow import run_sft

    _, flags = parse_argv(sys.argv[1:])
    cfg = build_config({**SETTINGS, **{k: yaml.safe_load(v) for k, v in flags.items()}})
    print("== sftlab retrieval-QA demo: SmolLM2-135M-Instruct + LoRA on the Marrowind Archipelago collection ==")
    t0 = time.time()
    before = evaluate_base(cfg)
    print(f"[demo] base model, end to end on {before.metrics['e2e_questions']} test questions: "
          f"{format_metrics(before.metrics)}")
    t1 = time.time()
    run_sft(cfg)
    t2 = time.time()
    after_metrics = json.load(open(os.path.join(OUT, "e2e_eval_results.json"), encoding="utf-8"))
    after = [json.loads(line) for line in open(os.path.join(OUT, "e2e_predictions.jsonl"), encoding="utf-8")]

    print("\n== held-out test questions, before and after fine-tuning ==")
    for b, a in list(zip(before.predictions, after))[:5]:
        print(f"\nQ: {a['question']}\n  retrieved: {', '.join(s.rsplit('/', 1)[-1] for s in a['retrieved_sources'])}"
              f"\n  before: {b['generated_answer'][:160]!r}\n  after:  {a['generated_answer'][:160]!r}"
              f"\n  wanted: {a['gold_answer']!r}")
    print("\n== end-to-end scores on the test questions (F1 and ROUGE-L on a 0-100 scale) ==")
    keys = [k for k in after_metrics if k != "e2e_questions"]
    print(f"{'metric':<28}{'before':>10}{'after':>10}")
    for k in keys:
        print(f"{k:<28}{before.metrics[k]:>10.3f}{after_metrics[k]:>10.3f}")
    print(f"\nanswer F1: {before.metrics['e2e_f1']:.1f} before -> {after_metrics['e2e_f1']:.1f} after fine-tuning")
    print(f"time: base evaluation {(t1 - t0) / 60:.1f} min, fine-tuning + evaluation {(t2 - t1) / 60:.1f} min, "
          f"total {(t2 - t0) / 60:.1f} min")
    print(f"Outputs in {OUT}/: adapter, trainer_log.jsonl (e2e_* of the evaluation), e2e_eval_results.json, "
          "e2e_predictions.jsonl, index/")
    return 0 if after_metrics["e2e_f1"] > before.metrics["e2e_f1"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
