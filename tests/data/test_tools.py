"""Golden tests for tool-call conversations: exactly which text is trained, and the generation prompt (also right
after a tool result) is exactly the start of the training example, for three templates: a Qwen-2.5-style one and
a Llama-3.1-style one (each renders tools itself) and the bundled tokenizer's (no tool support: sftlab's built-in
<tool_call> format). Expected texts are written out by hand from the documented formats."""

from __future__ import annotations

import json

import pytest

from sftlab.data import formats as F
from sftlab.data.loader import Row
from sftlab.data.templates import Message, ToolCall, load_template
from sftlab.data.tokenize import IGNORE_INDEX, encode_messages, encode_prompt
from sftlab.data.tools import parse_tool_calls
from sftlab.errors import ConfigError
from tests.assets.chat_templates import LLAMA31_TOOLS, QWEN25_TOOLS

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
OPENAI_ROW = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees."},
    ],
    "tools": [WEATHER],
}
# The same conversation as glaive / LLaMA-Factory write it: function_call / observation turns, tools as a string.
GLAIVE_ROW = {
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp\": 21}"},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([WEATHER["function"]]),
}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def conversation(data: dict):
    row = Row(data, "tools.jsonl", 1)
    fmt = F.detect_format(set(data), row.file)
    return F.to_messages(fmt, row, F.FormatOptions()), F.row_tools(row)


def trained_runs(tok, enc) -> list[str]:
    runs, cur = [], []
    for i, l in zip(enc.input_ids, enc.labels):
        if l != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(tok.decode(cur)), cur.clear()
    if cur:
        runs.append(tok.decode(cur))
    return runs


def assert_prompts_are_prefixes(tok, template, msgs, tools, enc):
    """For every assistant turn: the generation prompt's ids start the example and training starts right there."""
    starts = [i for i in range(len(enc.labels)) if enc.labels[i] != IGNORE_INDEX and (i == 0 or enc.labels[i - 1] == IGNORE_INDEX)]
    turns = [i for i, m in enumerate(msgs) if m.role == "assistant"]
    assert len(starts) == len(turns)
    for start, turn in zip(starts, turns):
        prompt = encode_prompt(tok, template, msgs[:turn], tools)
        assert enc.input_ids[: len(prompt)] == prompt
        assert start == len(prompt)


@pytest.fixture(scope="module")
def llama_tok(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    tok.add_special_tokens({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]})
    return tok


def test_openai_and_glaive_rows_read_the_same():
    a, tools_a = conversation(OPENAI_ROW)
    b, tools_b = conversation(GLAIVE_ROW)
    assert tools_a == tools_b == [WEATHER]
    assert [(m.role, m.content, [(c.name, c.arguments) for c in m.tool_calls], m.name) for m in a] == \
           [(m.role, m.content, [(c.name, c.arguments) for c in m.tool_calls], m.name) for m in b]
    assert a[1].tool_calls == (ToolCall("get_weather", {"city": "Paris"}, "c1"),)
    assert a[2].name == "get_weather"  # a tool result takes the name of the call it answers


@pytest.mark.parametrize("row", [OPENAI_ROW, GLAIVE_ROW], ids=["openai", "glaive"])
def test_qwen25_template_golden(smol_tokenizer, row):
    t = load_template({"name": "qwen25", "kind": "jinja", "jinja": QWEN25_TOOLS}, smol_tokenizer)
    assert t.tool_mode() == "template"
    msgs, tools = conversation(row)
    enc = encode_messages(smol_tokenizer, t, msgs, "completion", tools)
    system = ("<|im_start|>system\nYou are Qwen, a helpful assistant.\n\n# Tools\n\nYou may call one or more functions "
              "to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
              "tags:\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n\nFor each function call, return a json object "
              "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
              "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n")
    assert smol_tokenizer.decode(enc.input_ids) == (
        system + "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 21 degrees.<|im_end|>\n")
    assert trained_runs(smol_tokenizer, enc) == [f"<tool_call>\n{CALL}\n</tool_call><|im_end|>",
                                                 "It is 21 degrees.<|im_end|>"]
    assert_prompts_are_prefixes(smol_tokenizer, t, msgs, tools, enc)


def test_llama31_template_golden(llama_tok):
    t = load_template({"name": "llama31", "kind": "jinja", "jinja": LLAMA31_TOOLS}, llama_tok)
    msgs, tools = conversation(OPENAI_ROW)
    enc = encode_messages(llama_tok, t, msgs, "completion", tools)
    h = lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n"  # noqa: E731
    assert llama_tok.decode(enc.input_ids) == (
        "<|begin_of_text|>" + h("system") + "Environment: ipython\nCutting Knowledge Date: December 2023\n\n<|eot_id|>"
        + h("user") + "Given the following functions, please respond with a JSON for a function call with its proper "
        "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
        "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n"
        + json.dumps(WEATHER, indent=4) + "\n\nWeather in Paris?<|eot_id|>"
        + h("assistant") + '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>'
        + h("ipython") + "{\"temp\": 21}<|eot_id|>"
        + h("assistant") + "It is 21 degrees.<|eot_id|>")
    assert trained_runs(llama_tok, enc) == ['{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                                            "It is 21 degrees.<|eot_id|>"]
    assert_prompts_are_prefixes(llama_tok, t, msgs, tools, enc)


def test_bundled_template_uses_builtin_format_golden(smol_tokenizer):
    t = load_template(None, smol_tokenizer)
    assert t.tool_mode() == "builtin"
    msgs, tools = conversation(GLAIVE_ROW)
    enc = encode_messages(smol_tokenizer, t, msgs, "completion", tools)
    text = smol_tokenizer.decode(enc.input_ids)
    # The tools go at the end of the system turn (replacing the template's own default system text, which it only
    # writes when a conversation has no system turn), calls and results as <tool_call> / <tool_response> blocks.
    assert text == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n" + json.dumps(WEATHER)
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
        "<args-json-object>}\n</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n" + CALL + "\n</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n{\"temp\": 21}\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nIt is 21 degrees.<|im_end|>\n")
    assert trained_runs(smol_tokenizer, enc) == [f"<tool_call>\n{CALL}\n</tool_call><|im_end|>",
                                                 "It is 21 degrees.<|im_end|>"]
    assert_prompts_are_prefixes(smol_tokenizer, t, msgs, tools, enc)


def test_builtin_format_with_a_system_turn_and_parallel_calls(smol_tokenizer):
    """Two calls in one turn, two results merged into one user turn; the row's system text comes first."""
    t = load_template("chatml", smol_tokenizer)
    msgs = [Message("system", "Be brief."), Message("user", "Paris and Rome?"),
            Message("assistant", "Checking.", tool_calls=(ToolCall("get_weather", {"city": "Paris"}),
                                                          ToolCall("get_weather", {"city": "Rome"}))),
            Message("tool", "21"), Message("tool", "25"), Message("assistant", "21 and 25.")]
    enc = encode_messages(smol_tokenizer, t, msgs, "completion", [WEATHER])
    text = smol_tokenizer.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert ("<|im_start|>user\n<tool_response>\n21\n</tool_response>\n<tool_response>\n25\n</tool_response>"
            "<|im_end|>\n<|im_start|>assistant\n21 and 25.<|im_end|>") in text
    assert trained_runs(smol_tokenizer, enc) == [
        'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>',
        "21 and 25.<|im_end|>"]
    assert_prompts_are_prefixes(smol_tokenizer, t, msgs, [WEATHER], enc)


def test_last_turn_trains_only_the_answer_after_the_tool_result(smol_tokenizer):
    t = load_template({"name": "qwen25", "kind": "jinja", "jinja": QWEN25_TOOLS}, smol_tokenizer)
    msgs, tools = conversation(OPENAI_ROW)
    enc = encode_messages(smol_tokenizer, t, msgs, "last_turn", tools)
    assert trained_runs(smol_tokenizer, enc) == ["It is 21 degrees.<|im_end|>"]


def test_row_ending_in_a_call_trains_the_call(smol_tokenizer):
    t = load_template(None, smol_tokenizer)
    msgs, tools = conversation({**OPENAI_ROW, "messages": OPENAI_ROW["messages"][:2]})
    enc = encode_messages(smol_tokenizer, t, msgs, "completion", tools)
    assert trained_runs(smol_tokenizer, enc) == [f"<tool_call>\n{CALL}\n</tool_call><|im_end|>"]
    assert_prompts_are_prefixes(smol_tokenizer, t, msgs, tools, enc)


def test_tool_format_option(smol_tokenizer):
    from sftlab.config import DataArguments

    forced = load_template({"name": "qwen25", "kind": "jinja", "jinja": QWEN25_TOOLS}, smol_tokenizer,
                           data_args=DataArguments(tool_format="builtin"))
    assert forced.tool_mode() == "builtin"
    msgs, tools = conversation(OPENAI_ROW)
    assert "<|im_start|>system\nYou are Qwen" not in forced.render(msgs, tools).text
    with pytest.raises(ConfigError, match="tool_format=template: template 'tokenizer' has no tool-call support"):
        load_template(None, smol_tokenizer, data_args=DataArguments(tool_format="template"))
    with pytest.raises(ConfigError, match="tool_format: unknown value 'xml'"):
        load_template(None, smol_tokenizer, data_args=DataArguments(tool_format="xml"))


@pytest.mark.parametrize("text,calls", [
    (f"<tool_call>\n{CALL}\n</tool_call>", [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    ('Sure.\n<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call><tool_call>{"name": "b"}</tool_call>',
     [{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]),
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [{"name": "get_weather", "arguments": {"city": "Paris"}}]),
    ("<tool_call>{not json}</tool_call>", None),
    ("It is sunny.", None),
    ('{"city": "Paris"}', None),
])
def test_parse_tool_calls(text, calls):
    got = parse_tool_calls(text)
    assert (None if got is None else [{"name": c.name, "arguments": c.arguments} for c in got]) == calls


def test_without_reasoning_scores_the_answer_only():
    from sftlab.data.tools import without_reasoning

    assert without_reasoning("<think>\nhmm\n</think>\n\nParis") == "Paris"
    assert without_reasoning("Paris") == "Paris"
