"""Which trained tokens are answer text and which template markup, per template kind; the distribution summary."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from sftlab.data.dataset import EncodeSettings, encode_row
from sftlab.data.formats import FormatOptions
from sftlab.data.loader import Row
from sftlab.data.stats import SplitStats, distribution, row_tokens
from sftlab.data.templates import load_template
from sftlab.data.tokenize import IGNORE_INDEX


def _settings(cutoff: int = 1024, train_on: str = "completion") -> EncodeSettings:
    return EncodeSettings(train_on=train_on, cutoff_len=cutoff, truncation="keep_answer", dataset_format=None,
                          column_mapping={}, options=FormatOptions())


ROW = Row({"conversations": [{"from": "human", "value": "What is two plus two?"},
                             {"from": "gpt", "value": "Two plus two is four."},
                             {"from": "human", "value": "And three plus three?"},
                             {"from": "gpt", "value": "Six, of course."}]}, "d.jsonl", 1)


@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_markup_is_the_end_of_turn_marker_and_answers_are_the_text(smol_tokenizer, template):
    """Jinja (the bundled tokenizer's own template) and pattern templates: the trained tokens outside the answers'
    text decode to exactly one end-of-turn marker per turn, those inside to exactly the answers."""
    tok = smol_tokenizer
    tmpl = load_template(template, tok)
    enc, _ = encode_row("sharegpt", ROW, tok, tmpl, _settings(), with_answer_mask=True)
    trained = [(i, a) for i, l, a in zip(enc.input_ids, enc.labels, enc.answer_mask) if l != IGNORE_INDEX]
    markup = [tok.decode([i]) for i, a in trained if not a]
    answers = tok.decode([i for i, a in trained if a])
    assert markup == ["<|im_end|>", "<|im_end|>"]
    assert answers == "Two plus two is four.Six, of course."
    stats = SplitStats("train", 1024)
    stats.add("sharegpt", row_tokens("sharegpt", ROW, tok, tmpl, _settings()))
    assert (stats.markup_tokens, stats.trained_tokens) == (2, len(trained))
    assert stats.turns == {2: 1}


def test_text_rows_markup_is_the_appended_eos(smol_tokenizer):
    tmpl = load_template("chatml", smol_tokenizer)
    row = Row({"text": "Plain text to learn from."}, "d.jsonl", 1)
    r = row_tokens("text", row, smol_tokenizer, tmpl, _settings())
    stats = SplitStats("train", 1024)
    stats.add("text", r)
    n = len(smol_tokenizer("Plain text to learn from.", add_special_tokens=False)["input_ids"])
    assert (stats.trained_tokens, stats.markup_tokens, r.prompt_full, r.answer_full) == (n + 1, 1, 0, n + 1)


def test_truncation_keeps_the_answer_mask_aligned(smol_tokenizer):
    tmpl = load_template("chatml", smol_tokenizer)
    row = Row({"instruction": "word " * 60, "output": "answer " * 80}, "d.jsonl", 1)
    enc, _ = encode_row("alpaca", row, smol_tokenizer, tmpl, _settings(cutoff=64), with_answer_mask=True)
    assert enc.truncated and len(enc.answer_mask) == len(enc.input_ids) == 64
    text = smol_tokenizer.decode([i for i, a in zip(enc.input_ids, enc.answer_mask) if a])
    assert text.strip().split() == ["answer"] * 32  # the last 32 tokens: the answer's start


def test_distribution_matches_the_statistics_module():
    rng = random.Random(0)
    for n in (1, 2, 19, 20, 101):
        xs = [rng.randint(0, 500) for _ in range(n)]
        d = distribution(xs)
        s = sorted(xs)
        assert d["mean"] == round(statistics.fmean(xs), 2) and d["median"] == statistics.median(xs)
        assert d["max"] == max(xs) and d["p95"] == s[math.ceil(0.95 * n) - 1]
        assert sum(x <= d["p95"] for x in xs) >= 0.95 * n > sum(x < d["p95"] for x in xs)
