"""Rows of every supported format -> a list of `Message` (or plain text for the `text` format).

This is the only place that knows the formats; templates and tokenization see messages. Each converter validates
the fields it reads and raises `DataError` naming file, line and field. `drop` removes that many units of the oldest
context (earlier exchanges, alpaca history pairs, rqa chat_history entries): truncation uses it before cutting text.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from sftlab.data.loader import Row
from sftlab.data.messages import Message, ToolCall
from sftlab.data.templates import conversation_problem
from sftlab.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "rqa")
FUNCTION_CALL = "function_call"  # the pseudo-role of a sharegpt turn that holds an assistant's tool call(s)

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "function_call": FUNCTION_CALL,  # glaive / LLaMA-Factory: an assistant turn whose value is the call(s) as JSON
    "observation": "tool",
    "tool": "tool",
}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "function": "tool", "ipython": "tool", "developer": "system"}
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.S)


@dataclass
class FileFormat:
    """How one file's rows read, where it differs from the run's settings (from dataset_info.json)."""

    dataset_format: str | None = None
    column_mapping: dict[str, str] = field(default_factory=dict)
    role_map: dict[str, str] = field(default_factory=dict)
    sharegpt_keys: dict[str, str] = field(default_factory=dict)


@dataclass
class FormatOptions:
    role_map: dict[str, str] = field(default_factory=dict)  # extra sharegpt role names
    sharegpt_keys: dict[str, str] = field(default_factory=dict)  # {"role": "from", "content": "value"} overrides
    system: str | None = None
    files: dict[str, FileFormat] = field(default_factory=dict)  # per-file overrides, keyed by path

    def for_file(self, file: str) -> "FormatOptions":
        f = self.files.get(file)
        if f is None:
            return self
        return FormatOptions({**self.role_map, **f.role_map}, {**self.sharegpt_keys, **f.sharegpt_keys}, self.system)


def detect_format(keys: set[str], file: str) -> str:
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "question" in keys and "gold_answer" in keys:
        return "rqa"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise DataError(
        f"cannot tell the data format from the fields {sorted(keys)}; expected one of: messages (OpenAI), "
        "conversations (sharegpt), instruction+output (alpaca), prompt+completion, text, question+gold_answer (rqa); "
        "rename fields with column_mapping or set dataset_format",
        file=file,
    )


def apply_column_mapping(row: Row, mapping: dict[str, str]) -> Row:
    if not mapping:
        return row
    data = dict(row.data)
    for old, new in mapping.items():
        if old in data:
            data[new] = data.pop(old)
    return Row(data, row.file, row.line)


class _Ctx:
    """Names the row being converted in every error."""

    def __init__(self, row: Row):
        self.row = row

    def err(self, msg: str, field: str | None = None) -> DataError:
        return DataError(msg, file=self.row.file, line=self.row.line, field=field)

    def get_str(self, key: str, required: bool = True, obj: dict | None = None, where: str | None = None) -> str | None:
        src = self.row.data if obj is None else obj
        name = where or key
        if key not in src or src[key] is None:
            if required:
                raise self.err("missing (or null)", name)
            return None
        val = src[key]
        if isinstance(val, bool) or not isinstance(val, (str, int, float)):
            raise self.err(f"expected a string, found {type(val).__name__}", name)
        return str(val)

    def get_list(self, key: str, required: bool = True, obj: dict | None = None, where: str | None = None) -> list:
        src = self.row.data if obj is None else obj
        name = where or key
        val = src.get(key)
        if val is None:
            if required:
                raise self.err("missing (or null)", name)
            return []
        if not isinstance(val, list):
            raise self.err(f"expected a list, found {type(val).__name__}", name)
        return val


def _nonempty_answer(ctx: _Ctx, text: str, field: str) -> None:
    if not text.strip():
        raise ctx.err("the assistant answer is empty: there is nothing to train on", field)


def _check_conversation(ctx: _Ctx, msgs: list[Message], field: str, where: list[int | None]) -> list[Message]:
    """Turn order (templates.conversation_problem) and non-empty answers, naming the row's own item."""
    def name(i: int) -> str:
        return f"{field}[{where[i]}]" if i < len(where) and where[i] is not None else field

    problem = conversation_problem(msgs, need_final_assistant=True)
    if problem is not None:
        raise ctx.err(problem[1], name(problem[0]))
    for i, m in enumerate(msgs):
        if m.role == "assistant" and not m.tool_calls:
            _nonempty_answer(ctx, m.content, name(i))
    return msgs


def _drop_exchanges(msgs: list[Message], drop: int) -> list[Message] | None:
    """Remove the `drop` oldest exchanges (a user turn and everything up to the next one), keeping the system
    message and the final exchange."""
    if drop == 0:
        return msgs
    head = msgs[:1] if msgs and msgs[0].role == "system" else []
    body = msgs[len(head):]
    users = [i for i, m in enumerate(body) if m.role == "user"]
    if drop >= len(users):
        return None
    return head + body[users[drop]:]


# ---- one message ------------------------------------------------------------------------------------------------
def _scalar_text(ctx: _Ctx, content: Any, where: str) -> str | None:
    if content is not None and (isinstance(content, bool) or not isinstance(content, (str, int, float))):
        raise ctx.err(f"expected a string or a list of text parts, found {type(content).__name__}", where)
    return None if content is None else str(content)


def _content(ctx: _Ctx, content: Any, where: str) -> tuple[str | None, str | None, tuple[ToolCall, ...]]:
    """(text, reasoning, tool calls) of a message's content: a string, or a list of parts. Text parts (OpenAI
    {"type": "text", "text"}, LLaMA-Factory v1 {"type": "text", "value"}) are joined; LLaMA-Factory v1's
    {"type": "reasoning", "value"} and {"type": "tool_call", "value": <call JSON>} parts give the reasoning and the
    calls; any other part is multimodal, which sftlab does not train."""
    if not isinstance(content, list):
        return _scalar_text(ctx, content, where), None, ()
    texts, thoughts, calls = [], [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise ctx.err(f"expected a content part object, found {type(part).__name__}", at)
        kind = part.get("type", "text")
        value = part.get(kind) if isinstance(part.get(kind), str) else part.get("text", part.get("value"))
        if kind == "tool_call":
            value = next((part[k] for k in ("value", "tool_call", "text") if part.get(k) is not None), None)
            calls.append(_tool_call(ctx, _json_value(ctx, value, f"{at}.value", "the tool call"), f"{at}.value"))
            continue
        if kind not in ("text", "reasoning", "thinking"):
            raise ctx.err(f"content part of type '{kind}' is not supported: sftlab trains on text only "
                          "(multimodal data is out of scope)", f"{at}.type")
        if not isinstance(value, str):
            raise ctx.err(f"a {kind} part needs a string 'text' (or 'value')", at)
        (texts if kind == "text" else thoughts).append(value)
    return "".join(texts), ("".join(thoughts) if thoughts else None), tuple(calls)


def _json_value(ctx: _Ctx, value: Any, where: str, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise ctx.err(f"{what}: not valid JSON ({e.msg} at column {e.colno})", where) from None


def _tool_call(ctx: _Ctx, obj: Any, where: str) -> ToolCall:
    """An OpenAI tool call ({"id", "type": "function", "function": {"name", "arguments"}}) or a bare
    {"name", "arguments"} one; arguments an object or a JSON string of one."""
    if not isinstance(obj, dict):
        raise ctx.err(f"expected a tool call object, found {type(obj).__name__}", where)
    fn, at = (obj["function"], f"{where}.function") if isinstance(obj.get("function"), dict) else (obj, where)
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ctx.err("the tool call names no function", f"{at}.name")
    key = "arguments" if "arguments" in fn else "parameters" if "parameters" in fn else None
    args = _json_value(ctx, fn.get(key, {}), f"{at}.{key or 'arguments'}", "the tool call's arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ctx.err(f"the tool call's arguments must be a JSON object, found {type(args).__name__}",
                      f"{at}.{key or 'arguments'}")
    call_id = obj.get("id")
    return ToolCall(name, args, str(call_id) if call_id is not None else None)


def _train_flag(ctx: _Ctx, item: dict, where: str, role: str) -> bool | None:
    """loss_weight (0/1, LLaMA-Factory v1) or train (true/false, Axolotl): overrides train_on for this turn."""
    flag = None
    if item.get("loss_weight") is not None:
        w = item["loss_weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w not in (0, 1):
            raise ctx.err(f"loss_weight must be 0 or 1, found {w!r}", f"{where}.loss_weight")
        flag = bool(w)
    if item.get("train") is not None:
        if not isinstance(item["train"], bool):
            raise ctx.err(f"train must be true or false, found {item['train']!r}", f"{where}.train")
        flag = item["train"]
    if flag and role != "assistant":
        raise ctx.err(f"only assistant turns can be trained; this turn is '{role}'",
                      f"{where}.{'train' if 'train' in item else 'loss_weight'}")
    return flag


def _reasoning(ctx: _Ctx, item: dict, content: str, where: str) -> tuple[str | None, str]:
    """(reasoning, answer): a reasoning_content / thinking field, or a leading <think>...</think> block."""
    for key in REASONING_KEYS:
        if item.get(key) is not None:
            return _content(ctx, item[key], f"{where}.{key}")[0], content
    found = _THINK.match(content)
    if found:
        return found.group(1).strip("\n"), content[found.end():]
    return None, content


def _message(ctx: _Ctx, item: Any, where: str, role_key: str, content_key: str, role_map: dict[str, str]) -> Message:
    if not isinstance(item, dict):
        raise ctx.err(f"expected an object with '{role_key}' and '{content_key}', found {type(item).__name__}", where)
    role_raw = ctx.get_str(role_key, obj=item, where=f"{where}.{role_key}")
    role = role_map.get(role_raw, role_map.get(role_raw.lower()))
    if role is None:
        raise ctx.err(f"unknown role '{role_raw}'; known: {sorted(role_map)} (extend with sharegpt_role_map)",
                      f"{where}.{role_key}")
    content, part_reasoning, part_calls = _content(ctx, item.get(content_key), f"{where}.{content_key}")
    if (part_reasoning is not None or part_calls) and role not in ("assistant", FUNCTION_CALL):
        raise ctx.err(f"reasoning and tool_call parts belong to assistant turns; this turn is '{role}'",
                      f"{where}.{content_key}")
    if role == FUNCTION_CALL:
        if content is None:
            raise ctx.err("missing (or null)", f"{where}.{content_key}")
        calls = _json_value(ctx, content, f"{where}.{content_key}", "the function call")
        calls = calls if isinstance(calls, list) else [calls]
        return Message("assistant", "", tool_calls=tuple(_tool_call(ctx, c, f"{where}.{content_key}") for c in calls),
                       train=_train_flag(ctx, item, where, "assistant"))
    tool_calls = part_calls
    if role == "assistant" and item.get("tool_calls"):
        raw = ctx.get_list("tool_calls", obj=item, where=f"{where}.tool_calls")
        tool_calls += tuple(_tool_call(ctx, c, f"{where}.tool_calls[{j}]") for j, c in enumerate(raw))
    if content is None:
        if not tool_calls:
            raise ctx.err("missing (or null)", f"{where}.{content_key}")
        content = ""
    reasoning = part_reasoning
    if role == "assistant" and reasoning is None:
        reasoning, content = _reasoning(ctx, item, content, where)
    extra = {}
    if role == "tool":
        extra = {k: str(item[k]) for k in ("tool_call_id", "name") if item.get(k) is not None}
    return Message(role, content, tool_calls=tool_calls, reasoning=reasoning,
                   train=_train_flag(ctx, item, where, role), **extra)


def _name_tool_results(msgs: list[Message]) -> list[Message]:
    """Tool results without a name take the name of the call they answer (by id, else by position)."""
    out, calls, k = [], (), 0
    for m in msgs:
        if m.tool_calls:
            calls, k = m.tool_calls, 0
        elif m.role == "tool":
            if m.name is None and calls:
                by_id = [c for c in calls if m.tool_call_id and c.id == m.tool_call_id]
                call = by_id[0] if by_id else calls[min(k, len(calls) - 1)]
                m = replace(m, name=call.name, tool_call_id=m.tool_call_id or call.id)
            k += 1
        out.append(m)
    return out


def _role_content_messages(ctx: _Ctx, items: list, field: str, role_key: str, content_key: str,
                           role_map: dict[str, str]) -> list[Message]:
    return _name_tool_results([_message(ctx, item, f"{field}[{i}]", role_key, content_key, role_map)
                               for i, item in enumerate(items)])


def row_tools(row: Row) -> list[dict] | None:
    """The row's tool definitions (a `tools` list of JSON-schema functions, or a JSON string of one), in the
    OpenAI shape {"type": "function", "function": {...}} that chat templates take."""
    ctx = _Ctx(row)
    raw = row.data.get("tools")
    if raw is None or raw == "" or raw == []:
        return None
    tools = _json_value(ctx, raw, "tools", "tools")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise ctx.err(f"expected a list of function definitions, found {type(tools).__name__}", "tools")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and isinstance(t.get("function"), dict) else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"].strip():
            raise ctx.err("a tool definition needs a function name", f"tools[{i}].name")
        out.append({"type": "function", "function": fn})
    return out or None


def context_units(fmt: str, row: Row, opts: FormatOptions | None = None) -> int:
    """How many units of old context this row has that truncation may drop."""
    d = row.data
    if fmt == "alpaca":
        h = d.get("history")
        return len(h) if isinstance(h, list) else 0
    if fmt == "rqa":
        h = d.get("chat_history")
        return len(h) if isinstance(h, list) else 0
    if fmt in ("messages", "sharegpt"):
        msgs = to_messages(fmt, row, opts or FormatOptions())
        return max(0, sum(m.role == "user" for m in msgs) - 1)
    return 0


def _with_system(msgs: list[Message], where: list[int | None], system: str | None):
    if system and not (msgs and msgs[0].role == "system"):
        return [Message("system", system)] + msgs, [None] + where
    return msgs, where


def to_messages(fmt: str, row: Row, opts: FormatOptions, drop: int = 0) -> list[Message] | None:
    """The conversation of a row (None when `drop` removes more context than the row has)."""
    ctx = _Ctx(row)
    d = row.data
    opts = opts.for_file(row.file)
    if fmt == "alpaca":
        instruction = ctx.get_str("instruction")
        inp = ctx.get_str("input", required=False) or ""
        output = ctx.get_str("output")
        _nonempty_answer(ctx, output, "output")
        system = ctx.get_str("system", required=False) or opts.system
        history = ctx.get_list("history", required=False)
        msgs: list[Message] = [Message("system", system)] if system else []
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise ctx.err("expected [user, assistant] string pairs", f"history[{i}]")
            if i < drop:
                continue
            msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
        if drop > len(history):
            return None
        user = f"{instruction}\n{inp}" if inp.strip() else instruction
        return msgs + [Message("user", user), Message("assistant", output)]
    if fmt == "sharegpt":
        keys = {"role": "from", "content": "value", **opts.sharegpt_keys}
        role_map = {**SHAREGPT_ROLES, **opts.role_map}
        items = ctx.get_list("conversations")
        msgs = _role_content_messages(ctx, items, "conversations", keys["role"], keys["content"], role_map)
        system = ctx.get_str("system", required=False) or opts.system
        msgs, where = _with_system(msgs, list(range(len(msgs))), system)
        return _drop_exchanges(_check_conversation(ctx, msgs, "conversations", where), drop)
    if fmt == "messages":
        role_map = {**MESSAGE_ROLES, **opts.role_map}
        items = ctx.get_list("messages")
        msgs = _role_content_messages(ctx, items, "messages", "role", "content", role_map)
        msgs, where = _with_system(msgs, list(range(len(msgs))), opts.system)
        return _drop_exchanges(_check_conversation(ctx, msgs, "messages", where), drop)
    if fmt == "prompt_completion":
        role_map = {**MESSAGE_ROLES, **opts.role_map}
        p, c = d.get("prompt"), d.get("completion")
        if isinstance(p, list):
            prompt_msgs = _role_content_messages(ctx, p, "prompt", "role", "content", role_map)
        else:
            prompt_msgs = [Message("user", ctx.get_str("prompt"))]
        if isinstance(c, list):
            comp_msgs = _role_content_messages(ctx, c, "completion", "role", "content", role_map)
            if len(comp_msgs) != 1 or comp_msgs[0].role != "assistant":
                raise ctx.err("expected exactly one assistant message", "completion")
        else:
            comp_msgs = [Message("assistant", ctx.get_str("completion"))]
        msgs, where = _with_system(prompt_msgs + comp_msgs, list(range(len(prompt_msgs))), opts.system)
        return _drop_exchanges(_check_conversation(ctx, msgs, "prompt", where), drop)
    if fmt == "rqa":
        return rqa_messages(row.data, system=opts.system, drop_history=drop, _ctx=ctx)
    raise DataError(f"unknown dataset_format '{fmt}'; choose one of {FORMATS}", file=row.file)


def row_text(row: Row) -> str:
    ctx = _Ctx(row)
    text = ctx.get_str("text")
    if not text.strip():
        raise ctx.err("empty text: there is nothing to train on", "text")
    return text


# ---- retrieval QA -------------------------------------------------------------------------------------------
RQA_INSTRUCTION = "Answer the question using the passages below."
# Row field holding the prompt passages of rqa_context=retrieved (sftlab-specific, so user data cannot clash).
CONTEXT_DOCS_KEY = "sftlab_context_docs"


def default_fmt_content(page_content: str, metadata: dict | None) -> str:
    """The passage text the generator sees: source and title (when known) above the content.

    Matches LocalRQA's default formatter: `Source: ...` / `Title: ...` lines appear only for keys that are
    present, then `Content:` and the page content, with surrounding whitespace stripped.
    """
    metadata = metadata or {}
    parts = []
    if "source" in metadata:
        parts.append(f"Source: {metadata['source']}\n")
    if "title" in metadata:
        parts.append(f"Title: {metadata['title']}\n")
    parts.append("Content:\n")
    parts.append(page_content)
    return "".join(parts).strip()


def format_passage(doc: Any) -> str:
    """A passage as it appears in the prompt: its fmt_content, or the Source/Title/Content layout."""
    if isinstance(doc, dict):
        fmt = doc.get("fmt_content")
        page, meta = doc.get("page_content", doc.get("text", "")), doc.get("metadata") or {}
    else:  # sftlab.rqa.schema.Document or anything with the same attributes
        fmt = getattr(doc, "fmt_content", None)
        page, meta = getattr(doc, "page_content", ""), getattr(doc, "metadata", {}) or {}
    if isinstance(fmt, str) and fmt.strip():
        return fmt
    return default_fmt_content(str(page), meta)


def rqa_prompt(question: str, passages: list, history: list[tuple[str, str]]) -> str:
    """The user turn for a retrieval-QA row: passages, then the chat history, then the question."""
    parts = [RQA_INSTRUCTION, ""]
    for i, doc in enumerate(passages, start=1):
        parts += [f"[{i}] {format_passage(doc)}", ""]
    if history:
        parts.append("Conversation so far:")
        for speaker, message in history:
            parts.append(f"{'User' if speaker == 'user' else 'Assistant'}: {message}")
        parts.append("")
    parts.append(f"Question: {question}")
    return "\n".join(parts)


def rqa_messages(row: dict, passages: list | None = None, system: str | None = None, drop_history: int = 0,
                 _ctx: _Ctx | None = None) -> list[Message] | None:
    """The conversation for an rqa row: one user turn (passages, history, question) and the gold answer.

    The chat history goes into the prompt text, not into assistant turns, so only `gold_answer` is ever trained.
    The same function renders the prompt at evaluation time (with retrieved passages), so the two cannot drift.
    """
    ctx = _ctx or _Ctx(Row(row, "<row>", 0))
    question = ctx.get_str("question")
    answer = ctx.get_str("gold_answer", required=False)
    if passages is None:
        # rqa_context=retrieved rows (written by sftlab.rqa.e2e) carry the passages to show, gold ones included.
        key = CONTEXT_DOCS_KEY if row.get(CONTEXT_DOCS_KEY) is not None else "gold_docs"
        passages = ctx.get_list(key, required=False)
        for i, doc in enumerate(passages):
            if not isinstance(doc, dict):
                raise ctx.err(f"expected a document object, found {type(doc).__name__}", f"{key}[{i}]")
            if not isinstance(doc.get("page_content", doc.get("fmt_content")), str):
                raise ctx.err("missing page_content", f"{key}[{i}].page_content")
            if doc.get("metadata") is not None and not isinstance(doc.get("metadata"), dict):
                raise ctx.err("expected an object", f"{key}[{i}].metadata")
    history_raw = ctx.get_list("chat_history", required=False)
    if drop_history > len(history_raw):
        return None
    history = []
    for i, turn in enumerate(history_raw):
        if not isinstance(turn, dict):
            raise ctx.err(f"expected an object with speaker/message, found {type(turn).__name__}", f"chat_history[{i}]")
        speaker = ctx.get_str("speaker", obj=turn, where=f"chat_history[{i}].speaker")
        if speaker not in ("user", "assistant"):
            raise ctx.err(f"unknown speaker '{speaker}'; expected user or assistant", f"chat_history[{i}].speaker")
        message = ctx.get_str("message", obj=turn, where=f"chat_history[{i}].message")
        if i >= drop_history:
            history.append((speaker, message))
    msgs = [Message("system", system)] if system else []
    msgs.append(Message("user", rqa_prompt(question, passages, history)))
    if answer is not None:
        if _ctx is not None:
            _nonempty_answer(ctx, answer, "gold_answer")
        msgs.append(Message("assistant", answer))
    elif _ctx is not None:
        raise ctx.err("missing (or null)", "gold_answer")
    return msgs
