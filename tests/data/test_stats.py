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


# ---- the cache path against the per-row reference ------------------------------------------------------------
def _mixed_rows(rng: random.Random) -> dict[str, list[dict]]:
    """`messages` rows of 1-3 exchanges (30% with a system prompt), some far over the cutoff, one with no trained
    turn (dropped), and `text` rows in a file of their own."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    rows = []
    for i in range(60):
        msgs = [{"role": "system", "content": text(8)}] if rng.random() < 0.3 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": text(rng.randint(3, 30))},
                     {"role": "assistant", "content": text(rng.randint(80, 140) if i % 7 == 0 else rng.randint(2, 40))}]
        rows.append({"messages": msgs})
    for m in rows[5]["messages"]:
        if m["role"] == "assistant":
            m["train"] = False
    return {"messages": rows, "text": [{"text": text(rng.randint(5, 150))} for _ in range(25)]}


@pytest.mark.parametrize("truncation", ["keep_answer", "drop"])
def test_cache_statistics_equal_the_per_row_reference(tmp_path, smol_tokenizer, truncation):
    """SplitStats from the tokenized cache (what `sftlab data report` reads) has every number the per-row reference
    counts, on rows with truncation, drops, markup and several formats."""
    import json

    from sftlab.data.dataset import stream_rows, tokenize_files

    rows = _mixed_rows(random.Random(11))
    files = []
    for name, items in rows.items():
        files.append(str(tmp_path / f"{name}.jsonl"))
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    tmpl = load_template("tokenizer", smol_tokenizer)
    s = EncodeSettings(train_on="completion", cutoff_len=128, truncation=truncation, dataset_format=None,
                       column_mapping={}, options=FormatOptions())
    ref = SplitStats("train", 128)
    for fmt, row in stream_rows(files, None, {}, None, s.options):
        ref.add(fmt, row_tokens(fmt, row, smol_tokenizer, tmpl, s))
    ex, summary = tokenize_files(files, "train", smol_tokenizer, tmpl, s, cache_dir=str(tmp_path / "cache"))
    got = SplitStats.from_cache("train", 128, ex.row_facts(), ex.lengths(), ex.trained_counts(), summary.formats,
                                summary.dropped)
    assert got.to_dict() == ref.to_dict()
    assert list(got.kept_lengths) == list(ref.kept_lengths) and list(got.kept_rows) == list(ref.kept_rows)
    d = got.to_dict()  # the set has what the test is about
    assert d["markup_tokens"] > 0
    assert d["formats"] == {"messages": 60, "text": 25} and set(d["turns_per_row"]) == {"1", "2", "3"}
    if truncation == "drop":
        assert d["dropped"]["too long"] > 0 and d["dropped_row_tokens"] > 0
    else:
        assert d["truncated"] > 0 and d["answers_cut"] > 0 and d["answer_tokens_lost"] > 0
        assert d["dropped"] == {"no trained token": 1}
