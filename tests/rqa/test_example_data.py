"""The shipped retrieval-QA example: regenerating it reproduces the committed files, and the rows are sound."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

EX = Path(__file__).resolve().parents[2] / "examples" / "rqa"
FILES = ["documents.jsonl", "documents.pkl", "train_w_qa.jsonl", "eval_w_qa.jsonl", "test_w_qa.jsonl"]


def read(name):
    return [json.loads(line) for line in (EX / name).read_text(encoding="utf-8").splitlines()]


def test_regeneration_is_byte_identical(tmp_path):
    spec = importlib.util.spec_from_file_location("rqa_make_data", EX / "make_data.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve string annotations through sys.modules
    try:
        spec.loader.exec_module(mod)
        assert mod.main(["--out", str(tmp_path)]) == 0
    finally:
        sys.modules.pop(spec.name, None)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (EX / name).read_bytes(), name


@pytest.mark.parametrize("split, lo, hi", [("train", 200, 500), ("eval", 25, 35), ("test", 35, 45)])
def test_rows_follow_rqa_format_and_answers_are_grounded(split, lo, hi):
    rows = read(f"{split}_w_qa.jsonl")
    assert lo <= len(rows) <= hi
    docs = {d["page_content"] for d in read("documents.jsonl")}
    for r in rows:
        assert set(r) >= {"chat_history", "question", "gold_docs", "gold_answer"}
        assert len(r["gold_docs"]) == 1 and r["gold_docs"][0]["page_content"] in docs
        # Answers are one sentence quoted from the gold passage.
        assert r["gold_answer"] in r["gold_docs"][0]["page_content"]
        assert r["gold_docs"][0]["metadata"]["source"].startswith("https://")
        for turn in r["chat_history"]:
            assert turn["speaker"] in ("user", "assistant") and turn["message"]


def test_test_questions_are_unseen_paraphrases_of_trained_facts():
    train, evals, test = read("train_w_qa.jsonl"), read("eval_w_qa.jsonl"), read("test_w_qa.jsonl")
    train_q = {r["question"] for r in train}
    train_answers = {r["gold_answer"] for r in train}
    for r in evals + test:
        assert r["question"] not in train_q
        assert r["gold_answer"] in train_answers  # the fact is in the collection and in training
    assert {r["question"] for r in evals}.isdisjoint(r["question"] for r in test)
    assert sum(bool(r["chat_history"]) for r in train) >= 5
