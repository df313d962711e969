"""Every bad-input case fails with sftlab's own error naming the file, line and field."""

from __future__ import annotations

import json

import pytest

from sftlab.data.dataset import EncodeSettings, tokenize_files
from sftlab.data.formats import FormatOptions
from sftlab.data.templates import load_template
from sftlab.errors import DataError


def run(tmp_path, tok, name: str, content: bytes | str, **kw):
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    t = load_template("chatml", tok)
    s = EncodeSettings(kw.pop("train_on", "completion"), kw.pop("cutoff_len", 1024), kw.pop("truncation", "keep_answer"),
                       kw.pop("fmt", None), {}, FormatOptions())
    return tokenize_files([str(p)], "train", tok, t, s, cache_dir=str(tmp_path / "cache"), **kw)


def jl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


GOOD = {"instruction": "q", "output": "a"}


@pytest.mark.parametrize("content,needle", [
    (jl(GOOD, '{"instruction": "q", "output": ', GOOD), "bad.jsonl, line 2: malformed JSON"),
    (jl(GOOD, {"instruction": "q"}), "line 2, field 'output': missing"),
    (jl(GOOD, {"instruction": ["q"], "output": "a"}), "line 2, field 'instruction': expected a string, found list"),
    (jl({"conversations": [{"from": "alien", "value": "x"}, {"from": "gpt", "value": "y"}]}),
     "field 'conversations[0].from': unknown role 'alien'"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}),
     "line 1, field 'messages[1]': the assistant answer is empty"),
    (jl({"instruction": "q", "output": ""}), "field 'output': the assistant answer is empty"),
    (jl({"messages": [{"role": "assistant", "content": "x"}]}), "field 'messages[0]': a conversation must start"),
    (jl({"foo": 1}), "cannot tell the data format"),
    # tool calls
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}, {"role": "tool", "content": "r"},
        {"role": "assistant", "content": "y"}]}),
     "line 1, field 'messages[1].tool_calls[0].function.name': the tool call names no function"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris"}}]}]}),
     "line 1, field 'messages[1].tool_calls[0].function.arguments': the tool call's arguments: not valid JSON"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}),
     "field 'messages[1].tool_calls[0].function.arguments': the tool call's arguments must be a JSON object"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"},
                      {"role": "assistant", "content": "y"}]}),
     "line 1, field 'messages[1]': a tool result with no preceding tool call"),
    (jl({"conversations": [{"from": "human", "value": "x"}, {"from": "observation", "value": "r"},
                           {"from": "gpt", "value": "y"}]}),
     "field 'conversations[1]': a tool result with no preceding tool call"),
    (jl({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "get(1)"}]}),
     "field 'conversations[1].value': the function call: not valid JSON"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "tools": "[{"}),
     "line 1, field 'tools': tools: not valid JSON"),
    (jl({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
         "tools": [{"description": "no name"}]}), "field 'tools[0].name': a tool definition needs a function name"),
    (jl(GOOD, "[1, 2]"), "line 2: expected a JSON object, found list"),
    ("", "the file is empty"),
    (jl({"question": "q", "gold_answer": "a", "gold_docs": "nope"}), "field 'gold_docs': expected a list"),
    (jl({"question": "q", "gold_answer": "a", "chat_history": [{"speaker": "robot", "message": "m"}]}),
     "field 'chat_history[0].speaker': unknown speaker 'robot'"),
])
def test_bad_rows_name_file_line_field(tmp_path, smol_tokenizer, content, needle):
    with pytest.raises(DataError) as e:
        run(tmp_path, smol_tokenizer, "bad.jsonl", content)
    assert needle in str(e.value), str(e.value)
    assert "bad.jsonl" in str(e.value)


def test_non_utf8_file(tmp_path, smol_tokenizer):
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid UTF-8"):
        run(tmp_path, smol_tokenizer, "bad.jsonl", json.dumps(GOOD).encode() + b'\n{"instruction": "\xff\xfe"}\n')


def test_json_array_file_and_bad_element(tmp_path, smol_tokenizer):
    ex, summary = run(tmp_path, smol_tokenizer, "ok.json", json.dumps([GOOD, GOOD]))
    assert summary.kept == 2
    with pytest.raises(DataError, match="row 2 is a str"):
        run(tmp_path, smol_tokenizer, "bad.json", json.dumps([GOOD, "x"]))


def test_unsupported_suffix_and_missing_hub_dataset(tmp_path, smol_tokenizer):
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        run(tmp_path, smol_tokenizer, "x.txt", "hello")
    from sftlab.data.loader import read_rows

    with pytest.raises(DataError, match="not in the offline cache|offline cache"):
        read_rows("someorg/some-dataset-that-is-not-cached")


def test_csv_and_parquet(tmp_path, smol_tokenizer):
    import pandas as pd

    df = pd.DataFrame([{"instruction": "q1", "output": "a1"}, {"instruction": "q2", "output": "a2"}])
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_parquet(tmp_path / "d.parquet")
    t = load_template("chatml", smol_tokenizer)
    s = EncodeSettings("completion", 1024, "keep_answer", None, {}, FormatOptions())
    for name in ("d.csv", "d.parquet"):
        ex, summary = tokenize_files([str(tmp_path / name)], "train", smol_tokenizer, t, s,
                                     cache_dir=str(tmp_path / "c"))
        assert summary.kept == 2 and summary.formats == {"alpaca": 2}
