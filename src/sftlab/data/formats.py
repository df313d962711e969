"""Rows of every supported format -> a list of `Message` (or plain text for the `text` format).

This is the only place that knows the formats; templates and tokenization see messages. Each converter validates
the fields it reads and raises `DataError` naming file, line and field. `drop` removes that many units of the oldest
context (earlier exchanges, alpaca history pairs, rqa chat_history entries): truncation uses it before cutting text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sftlab.data.loader import Row
from sftlab.data.templates import Message
from sftlab.errors import DataError

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "rqa")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
}


@dataclass
class FormatOptions:
    role_map: dict[str, str] = field(default_factory=dict)  # extra sharegpt role names
    sharegpt_keys: dict[str, str] = field(default_factory=dict)  # {"role": "from", "content": "value"} overrides
    system: str | None = None


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


def _check_alternation(ctx: _Ctx, msgs: list[Message], field: str) -> list[Message]:
    body = msgs[1:] if msgs and msgs[0].role == "system" else msgs
    for i, m in enumerate(body):
        want = "user" if i % 2 == 0 else "assistant"
        if m.role != want:
            raise ctx.err(f"turn {i + 1} is '{m.role}' but '{want}' was expected (turns alternate, user first)", field)
    if not body:
        raise ctx.err("no user/assistant turns", field)
    if body[-1].role != "assistant":
        raise ctx.err("the conversation must end with an assistant turn", field)
    for i, m in enumerate(body):
        if m.role == "assistant":
            _nonempty_answer(ctx, m.content, f"{field}[{i + (len(msgs) - len(body))}]")
    return msgs


def _drop_exchanges(msgs: list[Message], drop: int) -> list[Message] | None:
    """Remove the `drop` oldest user/assistant exchanges, keeping system and the final exchange."""
    if drop == 0:
        return msgs
    head = msgs[:1] if msgs and msgs[0].role == "system" else []
    body = msgs[len(head):]
    n_exchanges = len(body) // 2
    if drop >= n_exchanges:
        return None
    return head + body[2 * drop:]


def _role_content_messages(ctx: _Ctx, items: list, field: str, role_key: str, content_key: str,
                           role_map: dict[str, str]) -> list[Message]:
    msgs = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise ctx.err(f"expected an object with '{role_key}' and '{content_key}', found {type(item).__name__}", where)
        role_raw = ctx.get_str(role_key, obj=item, where=f"{where}.{role_key}")
        role = role_map.get(role_raw, role_map.get(role_raw.lower()))
        if role is None:
            raise ctx.err(f"unknown role '{role_raw}'; known: {sorted(role_map)} (extend with sharegpt_role_map)",
                          f"{where}.{role_key}")
        content = item.get(content_key)
        if isinstance(content, list):  # OpenAI multi-part content: keep the text parts
            parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text"]
            content = "".join(parts)
        if content is None:
            raise ctx.err("missing (or null)", f"{where}.{content_key}")
        if not isinstance(content, str):
            raise ctx.err(f"expected a string, found {type(content).__name__}", f"{where}.{content_key}")
        msgs.append(Message(role, content))
    return msgs


def context_units(fmt: str, row: Row) -> int:
    """How many units of old context this row has that truncation may drop."""
    d = row.data
    if fmt == "alpaca":
        h = d.get("history")
        return len(h) if isinstance(h, list) else 0
    if fmt == "rqa":
        h = d.get("chat_history")
        return len(h) if isinstance(h, list) else 0
    if fmt in ("messages", "sharegpt"):
        items = d.get("messages" if fmt == "messages" else "conversations")
        if isinstance(items, list):
            n = len(items) - (1 if items and isinstance(items[0], dict) and
                              (items[0].get("role") == "system" or items[0].get("from") == "system") else 0)
            return max(0, n // 2 - 1)
    return 0


def to_messages(fmt: str, row: Row, opts: FormatOptions, drop: int = 0) -> list[Message] | None:
    """The conversation of a row (None when `drop` removes more context than the row has)."""
    ctx = _Ctx(row)
    d = row.data
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
        if system and not (msgs and msgs[0].role == "system"):
            msgs = [Message("system", system)] + msgs
        return _drop_exchanges(_check_alternation(ctx, msgs, "conversations"), drop)
    if fmt == "messages":
        role_map = {"system": "system", "user": "user", "assistant": "assistant", **opts.role_map}
        items = ctx.get_list("messages")
        msgs = _role_content_messages(ctx, items, "messages", "role", "content", role_map)
        if opts.system and not (msgs and msgs[0].role == "system"):
            msgs = [Message("system", opts.system)] + msgs
        return _drop_exchanges(_check_alternation(ctx, msgs, "messages"), drop)
    if fmt == "prompt_completion":
        role_map = {"system": "system", "user": "user", "assistant": "assistant", **opts.role_map}
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
        msgs = prompt_msgs + comp_msgs
        if opts.system and msgs[0].role != "system":
            msgs = [Message("system", opts.system)] + msgs
        return _drop_exchanges(_check_alternation(ctx, msgs, "prompt"), drop)
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
    """LocalRQA's passage layout when a document has no fmt_content (one rule, kept in rqa.documents)."""
    from sftlab.rqa.documents import default_fmt_content as rule

    return rule(page_content, metadata)


def format_passage(doc: Any) -> str:
    """A passage as it appears in the prompt: its fmt_content, or the Source/Title/Content layout."""
    if isinstance(doc, dict):
        fmt = doc.get("fmt_content")
        page, meta = doc.get("page_content", doc.get("text", "")), doc.get("metadata") or {}
    else:  # sftlab.rqa.documents.Document or anything with the same attributes
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
