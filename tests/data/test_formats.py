"""Golden tests for content parts and per-message weights: which assistant turns are trained."""

from __future__ import annotations

import json

import pytest

from sftlab.data import formats as F
from sftlab.data.loader import Row
from sftlab.data.templates import load_template
from sftlab.data.tokenize import encode_messages
from sftlab.errors import DataError
from tests.data.test_tools import trained_runs


def messages_of(data: dict):
    return F.to_messages("messages", Row(data, "r.jsonl", 3), F.FormatOptions())


def test_content_parts_openai_and_llamafactory_v1():
    plain = messages_of({"messages": [{"role": "user", "content": "Hello there"},
                                      {"role": "assistant", "content": "Hi"}]})
    openai = messages_of({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi"}]}]})
    v1 = messages_of({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Hello "}, {"type": "text", "value": "there"}],
         "loss_weight": 0.0},
        {"role": "assistant", "content": [{"type": "text", "value": "Hi"}], "loss_weight": 1.0}]})
    assert [(m.role, m.content) for m in openai] == [(m.role, m.content) for m in v1] == \
           [(m.role, m.content) for m in plain]


def test_non_text_part_is_an_error_naming_file_line_field():
    with pytest.raises(DataError, match=r"r.jsonl, line 3, field 'messages\[0\].content\[1\].type': content part of "
                                        r"type 'image_url' is not supported"):
        messages_of({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                {"type": "image_url", "image_url": {"url": "x"}}]},
                                  {"role": "assistant", "content": "A cat."}]})


CONV = [{"role": "user", "content": "One?"}, {"role": "assistant", "content": "First."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": "Second."}]


@pytest.mark.parametrize("flags,train_on,trained", [
    ({}, "completion", ["First.<|im_end|>", "Second.<|im_end|>"]),
    ({1: {"loss_weight": 0}}, "completion", ["Second.<|im_end|>"]),
    ({1: {"train": False}}, "completion", ["Second.<|im_end|>"]),
    ({1: {"train": True}}, "last_turn", ["First.<|im_end|>", "Second.<|im_end|>"]),
    ({3: {"loss_weight": 0.0}, 1: {"loss_weight": 1.0}}, "completion", ["First.<|im_end|>"]),
    ({0: {"loss_weight": 0}}, "last_turn", ["Second.<|im_end|>"]),
])
def test_per_message_weights_override_train_on(smol_tokenizer, flags, train_on, trained):
    items = [{**m, **flags.get(i, {})} for i, m in enumerate(CONV)]
    msgs = messages_of({"messages": items})
    enc = encode_messages(smol_tokenizer, load_template(None, smol_tokenizer), msgs, train_on)
    assert trained_runs(smol_tokenizer, enc) == trained


@pytest.mark.parametrize("item,needle", [
    ({"loss_weight": 0.5}, "field 'messages[1].loss_weight': loss_weight must be 0 or 1, found 0.5"),
    ({"train": "yes"}, "field 'messages[1].train': train must be true or false"),
])
def test_bad_weights(item, needle):
    with pytest.raises(DataError) as e:
        messages_of({"messages": [CONV[0], {**CONV[1], **item}]})
    assert needle in str(e.value)


def test_training_a_user_turn_is_an_error():
    with pytest.raises(DataError, match=r"field 'messages\[0\].loss_weight': only assistant turns can be trained"):
        messages_of({"messages": [{**CONV[0], "loss_weight": 1}, CONV[1]]})


def test_llamafactory_v1_reasoning_and_tool_call_parts():
    from tests.data.test_tools import OPENAI_ROW, WEATHER

    v1 = messages_of({"messages": [
        {"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}], "loss_weight": 0.0},
        {"role": "assistant", "content": [
            {"type": "reasoning", "value": "I need the weather."},
            {"type": "tool_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})}],
         "loss_weight": 1.0},
        {"role": "tool", "content": [{"type": "text", "value": "{\"temp\": 21}"}]},
        {"role": "assistant", "content": [{"type": "text", "value": "It is 21 degrees."}], "loss_weight": 1.0}],
        "tools": json.dumps([WEATHER])})
    openai = messages_of(OPENAI_ROW)
    strip = lambda m: (m.role, m.content, [(c.name, c.arguments) for c in m.tool_calls])  # noqa: E731
    assert [strip(m) for m in v1] == [strip(m) for m in openai]
    assert v1[1].reasoning == "I need the weather." and v1[1].train is True and v1[0].train is False


def test_reasoning_part_on_a_user_turn_is_an_error():
    with pytest.raises(DataError, match=r"field 'messages\[0\].content': reasoning and tool_call parts belong to "
                                        r"assistant turns"):
        messages_of({"messages": [{"role": "user", "content": [{"type": "reasoning", "value": "x"}]}, CONV[1]]})
