"""The batched, multi-process tokenization (sftlab.data.batched through dataset.tokenize_files) against the
per-row reference `encode_row`: the same input_ids and labels token for token, the same drop and truncation counts,
over a few hundred generated rows of every format and every template, with rows cut and dropped by cutoff_len."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from sftlab.data.dataset import EncodeSettings, encode_row, stream_rows, tokenize_files
from sftlab.data.formats import FormatOptions
from sftlab.data.templates import load_template, prefix_template, _finalize
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import DataError

WORDS = ("the quick brown fox jumps over a lazy dog while Paris is the capital of France and 12345 numbers "
         "café naïve 東京 [INST] <b>tags</b> question answer hello there").split()


def words(rng: random.Random, lo: int, hi: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))
    return text + rng.choice(["", ".", "?", "\n", " ", "  "])  # trailing spaces and newlines meet the template


def exchange_list(rng, n):
    return [(words(rng, 1, 30), words(rng, 1, 40)) for _ in range(n)]


def make_row(fmt: str, rng: random.Random) -> dict:
    n = rng.randint(1, 3)
    system = words(rng, 2, 12) if rng.random() < 0.3 else None
    if fmt == "messages":
        msgs = [{"role": "system", "content": system}] if system else []
        for q, a in exchange_list(rng, n):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return {"messages": msgs}
    if fmt == "sharegpt":
        conv = [{"from": "system", "value": system}] if system else []
        for q, a in exchange_list(rng, n):
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        return {"conversations": conv}
    if fmt == "alpaca":
        row = {"instruction": words(rng, 1, 20), "input": words(rng, 0, 10) if rng.random() < 0.5 else "",
               "output": words(rng, 1, 40)}
        if n > 1:
            row["history"] = [list(p) for p in exchange_list(rng, n - 1)]
        if system:
            row["system"] = system
        return row
    if fmt == "prompt_completion":
        return {"prompt": words(rng, 1, 30), "completion": words(rng, 1, 40)}
    if fmt == "text":
        return {"text": words(rng, 1, 80)}
    if fmt == "rqa":
        docs = [{"page_content": words(rng, 5, 30), "fmt_content": "", "metadata": {"source": f"d{i}.md"}}
                for i in range(rng.randint(1, 2))]
        history = [{"speaker": who, "message": text} for q, a in exchange_list(rng, n - 1)
                   for who, text in (("user", q), ("assistant", a))]
        return {"chat_history": history,
                "question": words(rng, 1, 20), "gold_docs": docs, "gold_answer": words(rng, 1, 30)}
    raise AssertionError(fmt)


FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "rqa")


def write_rows(path, fmt, n, seed):
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(make_row(fmt, rng), ensure_ascii=False) + "\n" for _ in range(n)))
    return str(path)


def reference(files, tok, template, s):
    """Examples and counts from encode_row, one row at a time."""
    examples, dropped, truncated = [], Counter(), 0
    for fmt, row in stream_rows(files, s.dataset_format, s.column_mapping, None):
        enc, why = encode_row(fmt, row, tok, template, s)
        if enc is None:
            dropped[why] += 1
        else:
            examples.append({"input_ids": enc.input_ids, "labels": enc.labels})
            truncated += enc.truncated
    return examples, dict(dropped), truncated


def templates_for(tok):
    yield load_template(None, tok)  # the tokenizer's own (Jinja) template, or 'plain' when it has none
    for name in ("chatml", "llama2", "mistral", "alpaca", "plain"):
        yield load_template(name, tok)
    yield _finalize(prefix_template("<s>[INST]", "[/INST]", " ", "</s>"), tok)


def check_same(files, tok, template, s, tmp_path, **kw):
    want, want_dropped, want_truncated = reference(files, tok, template, s)
    got, summary = tokenize_files(files, "train", tok, template, s, cache_dir=str(tmp_path / "cache"),
                                  overwrite_cache=True, **kw)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"example {i} differs"
    assert summary.dropped == want_dropped and summary.truncated == want_truncated
    assert summary.kept + sum(want_dropped.values()) == summary.rows_read
    return summary


@pytest.mark.parametrize("tok_name", ["smol_tokenizer", "sp_tokenizer"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_template_same_as_reference(fmt, tok_name, request, tmp_path):
    tok = request.getfixturevalue(tok_name)
    f = write_rows(tmp_path / f"{fmt}.jsonl", fmt, 24, seed=sum(map(ord, fmt)))
    for i, template in enumerate(templates_for(tok)):
        full = check_same([f], tok, template, EncodeSettings("completion", 8192, "keep_answer", None, {},
                                                             FormatOptions()), tmp_path / f"{i}")
        assert full.truncated == 0 and not full.dropped
        # Cutoffs at the 30th and 60th percentile of the lengths: keep_answer cuts rows (dropping context first),
        # drop drops them.
        lengths = sorted(tokenize_files([f], "train", tok, template, EncodeSettings(
            "completion", 8192, "keep_answer", None, {}, FormatOptions()), cache_dir=str(tmp_path / f"{i}" / "cache"))
            [0].lengths().tolist())
        cut = check_same([f], tok, template, EncodeSettings("last_turn", max(lengths[7], 16), "keep_answer", None,
                                                            {}, FormatOptions()), tmp_path / f"{i}-cut")
        drop = check_same([f], tok, template, EncodeSettings("all", max(lengths[14], 16), "drop", None, {},
                                                             FormatOptions()), tmp_path / f"{i}-drop")
        assert cut.truncated > 0 and drop.dropped.get("too long", 0) > 0


def test_hundreds_of_rows_over_two_processes(tmp_path, smol_tokenizer):
    files = [write_rows(tmp_path / f"{fmt}.jsonl", fmt, 60, seed=7) for fmt in FORMATS]
    template = load_template(None, smol_tokenizer)
    s = EncodeSettings("completion", 96, "keep_answer", None, {}, FormatOptions())
    summary = check_same(files, smol_tokenizer, template, s, tmp_path, num_workers=2)
    assert summary.rows_read == 360 and summary.truncated > 0
    assert summary.formats == {fmt: 60 for fmt in FORMATS}


def test_no_trained_token_dropped_and_counted(tmp_path, smol_tokenizer):
    # train_on=last_turn with a cutoff that leaves only earlier context would train nothing: such rows are counted.
    f = write_rows(tmp_path / "m.jsonl", "messages", 80, seed=3)
    template = load_template("chatml", smol_tokenizer)
    s = EncodeSettings("completion", 24, "keep_answer", None, {}, FormatOptions())
    summary = check_same([f], smol_tokenizer, template, s, tmp_path)
    assert summary.kept > 0


def test_bad_row_in_a_worker_names_file_line_and_field(tmp_path, smol_tokenizer):
    rng = random.Random(1)
    rows = [make_row("messages", rng) for _ in range(700)]
    rows[650]["messages"][-1]["content"] = {"x": 1}
    p = tmp_path / "bad.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = EncodeSettings("completion", 1024, "keep_answer", None, {}, FormatOptions())
    with pytest.raises(DataError, match=r"bad.jsonl, line 651, field 'messages\[\d\]\.content'") as err:
        tokenize_files([str(p)], "train", smol_tokenizer, load_template("chatml", smol_tokenizer), s,
                       cache_dir=str(tmp_path / "c"), num_workers=2)
    assert err.value.line == 651 and err.value.file == str(p)
    assert not any((tmp_path / "c").iterdir())  # nothing half-written is left as a cache entry


def test_arrow_file_opens_with_datasets_and_lengths_match(tmp_path, smol_tokenizer):
    import datasets

    f = write_rows(tmp_path / "m.jsonl", "messages", 50, seed=5)
    s = EncodeSettings("completion", 1024, "keep_answer", None, {}, FormatOptions())
    ex, _ = tokenize_files([f], "train", smol_tokenizer, load_template("chatml", smol_tokenizer), s,
                           cache_dir=str(tmp_path / "c"))
    ds = datasets.Dataset.from_file(ex.path)
    assert ds[7]["input_ids"] == ex[7]["input_ids"] and ds[49]["labels"] == ex[-1]["labels"]
    assert ex.lengths().tolist() == [len(e["input_ids"]) for e in ex]
    assert all(l == IGNORE_INDEX or l == i for e in ex for i, l in zip(e["input_ids"], e["labels"]))


def test_tool_calls_and_reasoning_same_as_reference(tmp_path, smol_tokenizer):
    from tests.assets.chat_templates import QWEN25_TOOLS
    from sftlab.data.templates import Template

    rng = random.Random(11)
    rows = []
    for i in range(60):
        row = make_row("messages", rng)
        if i % 3 == 0:
            row["messages"][-1]["reasoning_content"] = words(rng, 1, 20)
        if i % 3 == 1:
            row["messages"][-1:-1] = [
                {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps({"city": words(rng, 1, 2)})}}]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"temp": i})}]
            row["tools"] = [{"type": "function", "function": {"name": "get_weather", "parameters": {
                "type": "object", "properties": {"city": {"type": "string"}}}}}]
        rows.append(row)
    f = tmp_path / "tools.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qwen = _finalize(Template(name="qwen", kind="jinja", jinja=QWEN25_TOOLS), smol_tokenizer)
    for i, template in enumerate((load_template(None, smol_tokenizer), load_template("chatml", smol_tokenizer), qwen)):
        for train_on_reasoning in (True, False):
            s = EncodeSettings("completion", 4096, "keep_answer", None, {}, FormatOptions(),
                               train_on_reasoning=train_on_reasoning)
            check_same([str(f)], smol_tokenizer, template, s, tmp_path / f"{i}-{train_on_reasoning}")


def test_no_more_tokenization_processes_than_cpus(monkeypatch):
    from sftlab.data import batched

    monkeypatch.setattr(batched.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert [batched.usable_workers(n) for n in (None, 0, 1, 2, 16)] == [0, 0, 0, 2, 2]
    monkeypatch.setattr(batched.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert batched.usable_workers(16) == 8 and batched.usable_workers(3) == 3
