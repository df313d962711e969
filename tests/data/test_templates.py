"""Golden tests for reasoning: what of a thinking turn is trained, with a template that renders
`reasoning_content` itself (Qwen-3 style, which also writes an empty think block into turns without reasoning)
and with one that does not (the bundled tokenizer's: sftlab writes the think block into the content)."""

from __future__ import annotations

import pytest

from sftlab.data import formats as F
from sftlab.data.loader import Row
from sftlab.data.templates import load_template
from sftlab.data.tokenize import encode_messages
from tests.assets.chat_templates import QWEN3_THINKING
from tests.data.test_tools import assert_prompts_are_prefixes, trained_runs

ROW = {"messages": [{"role": "user", "content": "2+3?"},
                    {"role": "assistant", "reasoning_content": "Add them.", "content": "5"}]}
TWO_TURNS = {"messages": [{"role": "user", "content": "2+3?"},
                          {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n5"},
                          {"role": "user", "content": "times 2?"},
                          {"role": "assistant", "thinking": "Double it.", "content": "10"}]}


def encode(tok, template, data, **kw):
    row = Row(data, "r.jsonl", 1)
    msgs = F.to_messages("messages", row, F.FormatOptions())
    return msgs, encode_messages(tok, template, msgs, "completion", None, **kw)


@pytest.fixture(scope="module")
def qwen3(smol_tokenizer):
    return load_template({"name": "qwen3", "kind": "jinja", "jinja": QWEN3_THINKING}, smol_tokenizer)


@pytest.mark.parametrize("train_on_reasoning,trained", [
    (True, ["<think>\nAdd them.\n</think>\n\n5<|im_end|>"]),
    (False, ["5<|im_end|>"]),
])
def test_reasoning_content_with_a_thinking_template(smol_tokenizer, qwen3, train_on_reasoning, trained):
    msgs, enc = encode(smol_tokenizer, qwen3, ROW, train_on_reasoning=train_on_reasoning)
    assert smol_tokenizer.decode(enc.input_ids) == (
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n5<|im_end|>\n")
    assert trained_runs(smol_tokenizer, enc) == trained
    if train_on_reasoning:
        assert_prompts_are_prefixes(smol_tokenizer, qwen3, msgs, None, enc)


def test_empty_think_block_the_template_inserts_is_never_trained(smol_tokenizer, qwen3):
    msgs, enc = encode(smol_tokenizer, qwen3, {"messages": [ROW["messages"][0], {"role": "assistant", "content": "5"}]})
    assert smol_tokenizer.decode(enc.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n5<|im_end|>\n")
    assert trained_runs(smol_tokenizer, enc) == ["5<|im_end|>"]


@pytest.mark.parametrize("train_on_reasoning,trained", [
    (True, ["<think>\nAdd them.\n</think>\n\n5<|im_end|>", "<think>\nDouble it.\n</think>\n\n10<|im_end|>"]),
    (False, ["5<|im_end|>", "10<|im_end|>"]),
])
def test_reasoning_without_template_support_is_written_as_a_think_block(smol_tokenizer, train_on_reasoning, trained):
    """<think> in the content and a `thinking` field read alike; every trained turn follows train_on_reasoning."""
    t = load_template(None, smol_tokenizer)
    msgs, enc = encode(smol_tokenizer, t, TWO_TURNS, train_on_reasoning=train_on_reasoning)
    assert [m.reasoning for m in msgs if m.role == "assistant"] == ["Add them.", "Double it."]
    assert "<|im_start|>assistant\n<think>\nDouble it.\n</think>\n\n10<|im_end|>" in smol_tokenizer.decode(enc.input_ids)
    assert trained_runs(smol_tokenizer, enc) == trained
    if train_on_reasoning:
        assert_prompts_are_prefixes(smol_tokenizer, t, msgs, None, enc)


def test_pattern_template_reasoning(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    _, enc = encode(smol_tokenizer, t, ROW, train_on_reasoning=False)
    assert smol_tokenizer.decode(enc.input_ids) == (
        "<|im_start|>user\n2+3?<|im_end|>\n<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n5<|im_end|>\n")
    assert trained_runs(smol_tokenizer, enc) == ["5<|im_end|>"]


def test_template_that_drops_reasoning_is_an_error_naming_the_row(tmp_path, smol_tokenizer):
    """A template that takes `reasoning_content` but does not write it for this turn: the row is named."""
    import json

    from sftlab.data.dataset import EncodeSettings, tokenize_files
    from sftlab.errors import DataError

    drops = QWEN3_THINKING.replace("message.reasoning_content.strip('\\n')", "''")
    t = load_template({"name": "drops", "kind": "jinja", "jinja": drops}, smol_tokenizer)
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps(ROW) + "\n")
    s = EncodeSettings("completion", 1024, "keep_answer", None, {}, F.FormatOptions())
    with pytest.raises(DataError, match=r"r.jsonl, line 1: message 1: the chat template does not render this turn's "
                                        r"reasoning"):
        tokenize_files([str(f)], "train", smol_tokenizer, t, s, cache_dir=str(tmp_path / "c"))
