"""Tool calls and reasoning: sftlab's built-in text format for templates without tool support, and reading calls
back out of generated text.

The built-in format is the Hermes / Qwen-2.5 one (docs/DATA_FORMATS.md):

* the tool definitions go at the end of the system prompt, one JSON object per line inside ``<tools></tools>``;
* an assistant turn's calls follow its text, each as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* tool results become one user turn, each result inside ``<tool_response>\\n...\\n</tool_response>``;
* reasoning, for a template that does not render ``reasoning_content`` itself, opens the assistant turn as
  ``<think>\\n...\\n</think>\\n\\n``.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from typing import Any

from sftlab.data.messages import Message, ToolCall

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n"
    "</tool_call>"
)


def tools_block(tools: list[dict]) -> str:
    return TOOLS_PREAMBLE + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_POSTAMBLE


def call_text(call: ToolCall) -> str:
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def calls_text(calls: tuple[ToolCall, ...] | list[ToolCall]) -> str:
    return "\n".join(call_text(c) for c in calls)


def assistant_text(m: Message) -> str:
    """An assistant turn's content followed by its calls in the built-in format."""
    if not m.tool_calls:
        return m.content
    return (m.content + "\n" if m.content else "") + calls_text(m.tool_calls)


def inline_reasoning(m: Message) -> Message:
    """Reasoning written into the content as a leading think block (templates without `reasoning_content`)."""
    if m.role != "assistant" or m.reasoning is None:
        return m
    return replace(m, content=f"<think>\n{m.reasoning}\n</think>\n\n{m.content}")


def builtin_tool_messages(messages: list[Message], origin: list[int], tools: list[dict],
                          default_system: str | None) -> tuple[list[Message], list[int]]:
    """The conversation with tools, calls and results written as text (system / user / assistant turns only).

    Consecutive tool results become one user turn; `origin` is carried along (a merged turn keeps its first)."""
    out: list[Message] = []
    where: list[int] = []
    if tools:
        if messages and messages[0].role == "system":
            system = messages[0].content + "\n\n" + tools_block(tools)
            out.append(replace(messages[0], content=system))
            where.append(origin[0])
            messages, origin = messages[1:], origin[1:]
        else:
            out.append(Message("system", (default_system + "\n\n" if default_system else "") + tools_block(tools)))
            where.append(-1)
    previous_role = None
    for m, o in zip(messages, origin):
        if m.role == "tool":
            response = f"<tool_response>\n{m.content}\n</tool_response>"
            if previous_role == "tool":
                out[-1] = replace(out[-1], content=out[-1].content + "\n" + response)
            else:
                out.append(Message("user", response))
                where.append(o)
        elif m.role == "assistant" and m.tool_calls:
            out.append(Message("assistant", assistant_text(m), reasoning=m.reasoning, train=m.train))
            where.append(o)
        else:
            out.append(m)
            where.append(o)
        previous_role = m.role
    return out, where


# ---- generated text -> calls ------------------------------------------------------------------------------------
_TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _call_from_json(text: str) -> ToolCall | None:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return ToolCall(obj["name"], args) if isinstance(args, dict) else None


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in generated text: ``<tool_call>`` JSON blocks, or a whole reply that is one JSON call
    (Llama-3.1 style, ``parameters`` or ``arguments``). None when the text holds no call that parses."""
    blocks = _TOOL_CALL.findall(text)
    if blocks:
        calls = [_call_from_json(b) for b in blocks]
        return None if any(c is None for c in calls) else calls
    stripped = text.strip()
    if stripped.startswith("{"):
        call = _call_from_json(stripped)
        return [call] if call else None
    return None


def without_reasoning(text: str) -> str:
    """A generated reply's answer: the text after its think block, when it has one (what labels hold)."""
    at = text.rfind("</think>")
    return text[at + len("</think>"):].strip() if at >= 0 else text


def call_dicts(calls: list[ToolCall] | tuple[ToolCall, ...]) -> list[dict[str, Any]]:
    return [{"name": c.name, "arguments": c.arguments} for c in calls]
