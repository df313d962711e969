"""cutoff_len policies, drop accounting, the summary, column mapping, several files, and the on-disk cache."""

from __future__ import annotations

import json

import pytest

from sftlab.data.dataset import EncodeSettings, split_off, tokenize_files
from sftlab.data.formats import FormatOptions
from sftlab.data.templates import load_template
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import DataError


def write(tmp_path, name, rows):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(p)


def settings(cutoff, truncation="keep_answer", train_on="completion", mapping=None):
    return EncodeSettings(train_on, cutoff, truncation, None, mapping or {}, FormatOptions())


LONG_PROMPT = {"instruction": "word " * 200, "output": "short answer"}
LONG_ANSWER = {"instruction": "q", "output": "answer " * 200}
HISTORY = {"instruction": "final question", "output": "final answer",
           "history": [["old question " * 20, "old answer " * 20], ["newer question", "newer answer"]]}


def test_keep_answer_cuts_prompt_from_left_and_keeps_answer(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [LONG_PROMPT])
    ex, summary = tokenize_files([f], "train", smol_tokenizer, t, settings(64), cache_dir=str(tmp_path / "c"))
    ids, labels = ex[0]["input_ids"], ex[0]["labels"]
    assert len(ids) == 64 and summary.truncated == 1 and summary.kept == 1
    trained = smol_tokenizer.decode([i for i, l in zip(ids, labels) if l != IGNORE_INDEX])
    assert trained == "short answer<|im_end|>"
    # The prompt lost its beginning (system/user header), not its end.
    assert smol_tokenizer.decode(ids).startswith(" word") or smol_tokenizer.decode(ids).startswith("word")


def test_keep_answer_long_answer_keeps_its_start_and_half_the_prompt(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [LONG_ANSWER])
    ex, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(64), cache_dir=str(tmp_path / "c"))
    ids, labels = ex[0]["input_ids"], ex[0]["labels"]
    first_trained = next(i for i, l in enumerate(labels) if l != IGNORE_INDEX)
    assert len(ids) == 64
    assert smol_tokenizer.decode(ids[first_trained:]).startswith("answer answer")
    assert first_trained > 0  # some prompt is kept


def test_oldest_history_dropped_first(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [HISTORY])
    full, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(4096), cache_dir=str(tmp_path / "c"))
    n_full = len(full[0]["input_ids"])
    ex, summary = tokenize_files([f], "train", smol_tokenizer, t, settings(n_full - 10), cache_dir=str(tmp_path / "c"))
    text = smol_tokenizer.decode(ex[0]["input_ids"])
    assert "old question" not in text and "newer question" in text and "final answer" in text
    assert summary.truncated == 1


def test_drop_and_error_policies_and_counts(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [LONG_PROMPT, {"instruction": "q", "output": "a"}, LONG_ANSWER])
    ex, summary = tokenize_files([f], "train", smol_tokenizer, t, settings(64, "drop"), cache_dir=str(tmp_path / "c"))
    assert summary.rows_read == 3 and summary.kept == 1 and summary.dropped == {"too long": 2}
    assert "dropped 2 (too long: 2)" in summary.line()
    with pytest.raises(DataError, match=r"a.jsonl, line 1: .* exceed cutoff_len=64"):
        tokenize_files([f], "train", smol_tokenizer, t, settings(64, "error"), cache_dir=str(tmp_path / "c"))


def test_row_without_trained_token_is_dropped_and_counted(tmp_path, smol_tokenizer):
    """A prompt so long that even half the budget leaves no room for the answer? keep_answer always keeps the
    answer start, so force the case with an answer that is cut away by a 1-token budget for it."""
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [{"instruction": "q", "output": "a"}, LONG_PROMPT])
    ex, summary = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), cache_dir=str(tmp_path / "c"))
    assert summary.dropped == {}
    assert summary.trained_tokens == sum(sum(l != IGNORE_INDEX for l in e["labels"]) for e in ex)
    assert summary.prompt_tokens + summary.trained_tokens == sum(len(e["input_ids"]) for e in ex)


def test_column_mapping_and_multiple_files(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    a = write(tmp_path, "a.jsonl", [{"q": "x", "a": "y"}])
    b = write(tmp_path, "b.jsonl", [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "v"}]}])
    ex, summary = tokenize_files([a, b], "train", smol_tokenizer, t,
                                 settings(1024, mapping={"q": "instruction", "a": "output"}), cache_dir=str(tmp_path / "c"))
    assert summary.formats == {"alpaca": 1, "messages": 1} and summary.kept == 2


def test_cache_hit_and_invalidation(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = write(tmp_path, "a.jsonl", [{"instruction": "q", "output": "a"}])
    cache = tmp_path / "c"
    ex1, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 1
    ex2, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), cache_dir=str(cache))
    assert ex1 == ex2 and len(list(cache.iterdir())) == 1
    # Changing the data, the template or a setting gives a new cache entry, never a stale one.
    tokenize_files([f], "train", smol_tokenizer, t, settings(1024, train_on="all"), cache_dir=str(cache))
    tokenize_files([f], "train", smol_tokenizer, load_template("alpaca", smol_tokenizer), settings(1024),
                   cache_dir=str(cache))
    write(tmp_path, "a.jsonl", [{"instruction": "q", "output": "b"}])
    ex3, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 4 and ex3 != ex1


def test_multiprocess_tokenization_matches_single(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(80)]
    f = write(tmp_path, "a.jsonl", rows)
    one, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), cache_dir=str(tmp_path / "c1"))
    two, _ = tokenize_files([f], "train", smol_tokenizer, t, settings(1024), num_workers=2,
                            cache_dir=str(tmp_path / "c2"))
    assert one == two


def test_val_split(tmp_path):
    ex = [{"input_ids": [i], "labels": [i]} for i in range(10)]
    tr, ev = split_off(ex, 0.2, seed=1)
    assert len(tr) == 8 and len(ev) == 2 and sorted(e["input_ids"][0] for e in tr + ev) == list(range(10))
    assert split_off(ex, 0.2, seed=1) == (tr, ev)
    with pytest.raises(DataError):
        split_off(ex, 0.0, seed=1)
