"""fit_prompt: the one rule that fits a generation prompt to cutoff_len (predict, generative eval, RQA end to end):
the oldest context goes first, whole, then the prompt is cut from the left."""

from __future__ import annotations

import json

from sftlab.data.dataset import EncodeSettings, prediction_items
from sftlab.data.formats import FormatOptions, to_messages
from sftlab.data.loader import Row
from sftlab.data.templates import load_template
from sftlab.data.tokenize import encode_prompt, fit_prompt

ROW = {"messages": [
    {"role": "user", "content": "old question " * 30}, {"role": "assistant", "content": "old answer " * 30},
    {"role": "user", "content": "new question " * 5}, {"role": "assistant", "content": "new answer"},
    {"role": "user", "content": "final question?"}, {"role": "assistant", "content": "final answer"}]}


def prompts(tok, t, drop):
    msgs = to_messages("messages", Row(ROW, "r.jsonl", 1), FormatOptions(), drop=drop)
    return encode_prompt(tok, t, msgs[:-1])


def without(n):
    msgs = to_messages("messages", Row(ROW, "r.jsonl", 1), FormatOptions(), drop=n) if n <= 2 else None
    return msgs[:-1] if msgs else None


def test_oldest_exchange_dropped_first_then_cut_from_the_left(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    full, one, two = (prompts(smol_tokenizer, t, d) for d in (0, 1, 2))
    assert len(full) > len(one) > len(two)
    assert fit_prompt(smol_tokenizer, t, without, len(full))[0] == full
    assert fit_prompt(smol_tokenizer, t, without, len(full) - 1)[0] == one  # the old exchange went, whole
    ids, used = fit_prompt(smol_tokenizer, t, without, len(one) - 1)
    assert ids == two and used[-1].content == "final question?"
    assert fit_prompt(smol_tokenizer, t, without, 5)[0] == two[-5:]  # then the start of the last prompt


def test_prediction_items_fit_prompts_the_same_way(tmp_path, smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps(ROW) + "\n")
    cutoff = len(prompts(smol_tokenizer, t, 0)) - 1
    s = EncodeSettings("completion", cutoff, "keep_answer", None, {}, FormatOptions())
    [item] = prediction_items([str(f)], smol_tokenizer, t, s)
    assert item.prompt_ids == prompts(smol_tokenizer, t, 1) and item.label == "final answer"
    assert "old question" not in item.prompt and item.prompt == t.render_prompt(item.messages)
