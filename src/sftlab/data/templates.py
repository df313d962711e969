"""Chat templates: messages -> text, with the character spans of every trained assistant turn.

Three kinds of template, one `Template` type:

* ``tokenizer`` — the tokenizer's own Jinja chat template. Spans come from rendering the conversation up to each
  assistant turn with ``add_generation_prompt=True`` (where the answer starts) and up to the end of that turn (where
  it ends); the conversation must render as a prefix-extension at every turn, which is checked.
* built-in patterns — ``chatml``, ``llama2``, ``mistral``, ``alpaca``, ``plain``: a few format strings each.
* ``prefix`` — LocalRQA's ``user_prefix``/``assistant_prefix``/``sep_user``/``sep_sys`` arguments. One exchange is
  rendered as ``{user_prefix}{sep_user}{question}{sep_user}{assistant_prefix}{sep_user}`` followed by the trained
  ``{answer}{sep_sys}``; a system prompt is put before the first question, separated by a blank line. With
  ``--user_prefix "<s>[INST]" --assistant_prefix "[/INST]" --sep_user " " --sep_sys "</s>"`` a turn reads
  ``<s>[INST] question [/INST] answer</s>``.

A trained span is the assistant's content plus the text that ends its turn (``<|im_end|>``, ``</s>``...), so the
model learns to stop; whitespace after the end-of-turn marker is not trained. The template is saved with every
checkpoint as ``sftlab_template.json`` and reloaded from there by every later command.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sftlab.data.jinja import compiled_jinja
from sftlab.data.messages import Message, ToolCall
from sftlab.errors import ConfigError, DataError

TEMPLATE_FILE = "sftlab_template.json"
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]  # character spans of trained assistant text, in order
    turns: list[int] = field(default_factory=list)  # the message each span belongs to (index into the messages)
    # Per span: it starts where the model starts writing the turn (the generation prompt's end), so tokens that
    # merge across that point are trained; False for text after an untrained part (a think block) of the turn.
    opens_turn: list[bool] = field(default_factory=list)


@dataclass
class Template:
    """How a conversation becomes text. ``kind`` is 'jinja' or 'pattern'; the other fields serve that kind."""

    name: str
    kind: str
    jinja: str | None = None
    # pattern templates: {content} is replaced; {bos}/{eos} become the tokenizer's tokens when loaded
    system_format: str = ""  # rendered once before the first user turn ("" -> merged into the first user turn)
    user_format: str = "{content}"  # includes the generation prompt (what precedes the answer)
    assistant_end: str = ""  # trained: ends the assistant turn
    assistant_after: str = ""  # untrained separator after the turn
    system_merge: str = "{system}\n\n{content}"  # used when system_format is empty
    default_system: str | None = None
    prefix: str = ""  # text at the very start (e.g. a BOS for templates whose user turn has none)
    stop_strings: list[str] = field(default_factory=list)

    tool_format: str = "auto"  # auto | template | builtin: how tool definitions, calls and results are rendered

    # ---- rendering -------------------------------------------------------------------------------------
    def render(self, messages: list[Message], tools: list[dict] | None = None,
               train_on_reasoning: bool = True) -> Rendered:
        """The conversation as text, with the spans of every assistant turn (see `grade_reasoning` for thinking)."""
        _check_messages(messages, need_final_assistant=True)
        prepared = self._prepare(messages, tools)
        if self.kind == "jinja":
            rendered = self._render_jinja(prepared)
        else:
            rendered = self._render_pattern(prepared.messages, add_generation_prompt=False)
        rendered.turns = [prepared.origin[t] for t in rendered.turns]
        return grade_reasoning(rendered, messages, train_on_reasoning)

    def render_prompt(self, messages: list[Message], tools: list[dict] | None = None) -> str:
        """The text the model is given to write the next assistant turn (messages end with a user or tool turn)."""
        _check_messages(messages, need_final_assistant=False)
        prepared = self._prepare(messages, tools)
        if self.kind == "jinja":
            return self._jinja(prepared.messages, add_generation_prompt=True, tools=prepared.tools)
        return self._render_pattern(prepared.messages, add_generation_prompt=True).text

    # ---- tools and reasoning ----------------------------------------------------------------------------
    def tool_mode(self) -> str:
        """'template' when the template renders tools itself, 'builtin' when sftlab's <tool_call> format does."""
        if self.tool_format not in ("auto", "template", "builtin"):
            raise ConfigError(f"tool_format: unknown value '{self.tool_format}'; choose auto, template or builtin")
        native = self.kind == "jinja" and "tool_calls" in (self.jinja or "")
        if self.tool_format == "template" and not native:
            raise ConfigError(f"tool_format=template: template '{self.name}' has no tool-call support; use "
                              "tool_format auto or builtin (sftlab's <tool_call> JSON format)")
        return "builtin" if self.tool_format == "builtin" or not native else "template"

    def describe_tools(self) -> str:
        if self.tool_mode() == "template":
            return "tool calls rendered by the chat template's own tool support"
        return "tool calls rendered in sftlab's built-in format (<tool_call> JSON, <tool_response>; docs/DATA_FORMATS.md)"

    def _prepare(self, messages: list[Message], tools: list[dict] | None) -> "_Prepared":
        from sftlab.data import tools as T

        msgs, origin = list(messages), list(range(len(messages)))
        if self.kind == "jinja" and self.default_system and msgs[0].role != "system":
            msgs, origin = [Message("system", self.default_system), *msgs], [-1, *origin]
        native_reasoning = self.kind == "jinja" and "reasoning_content" in (self.jinja or "")
        if not native_reasoning:
            msgs = [T.inline_reasoning(m) for m in msgs]
        uses_tools = bool(tools) or any(m.tool_calls or m.role == "tool" for m in msgs)
        if not uses_tools or self.tool_mode() == "template":
            return _Prepared(msgs, origin, tools or None)
        system = self.default_system if self.kind == "pattern" else None
        msgs, origin = T.builtin_tool_messages(msgs, origin, tools or [], system)
        return _Prepared(msgs, origin, None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Template":
        known = set(Template.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"template definition has unknown keys {sorted(unknown)}; known: {sorted(known)}")
        return Template(**d)

    # ---- pattern kind -----------------------------------------------------------------------------------
    def _render_pattern(self, messages: list[Message], add_generation_prompt: bool) -> Rendered:
        system = self.default_system
        body = list(messages)
        if body and body[0].role == "system":
            system = body[0].content
            body = body[1:]
        parts: list[str] = [self.prefix]
        pos = len(self.prefix)
        spans: list[tuple[int, int]] = []
        turns: list[int] = []
        first_user = True
        for index, m in enumerate(body, start=len(messages) - len(body)):
            if m.role == "user":
                content = m.content
                if first_user and system:
                    if self.system_format:
                        s = self.system_format.replace("{content}", system)
                        parts.append(s)
                        pos += len(s)
                    else:
                        content = self.system_merge.replace("{system}", system).replace("{content}", content)
                first_user = False
                s = self.user_format.replace("{content}", content)
            else:  # assistant
                trained = m.content + self.assistant_end
                spans.append((pos, pos + len(trained)))
                turns.append(index)
                s = trained + self.assistant_after
            parts.append(s)
            pos += len(s)
        return Rendered("".join(parts), spans, turns, [True] * len(spans))

    # ---- jinja kind -------------------------------------------------------------------------------------
    def _jinja(self, messages: list[Message], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        dicts = [_jinja_message(m) for m in messages]
        if not tools and all(len(d) == 2 for d in dicts):  # role and content only
            from sftlab.data.shapes import render_by_shape

            text = render_by_shape(self, dicts, add_generation_prompt)
            if text is not None:
                return text
        return self.jinja_render(dicts, add_generation_prompt, tools)

    def jinja_render(self, messages: list[dict], add_generation_prompt: bool, tools: list[dict] | None = None) -> str:
        """The Jinja template rendered for message dicts (compiled once per process)."""
        extra = {"tools": tools} if tools else {}
        return compiled_jinja(self.jinja or "").render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._special.get("bos", ""),
            eos_token=self._special.get("eos", ""),
            **extra,
        )

    def _render_jinja(self, prepared: "_Prepared") -> Rendered:
        messages, tools = prepared.messages, prepared.tools
        full = self._jinja(messages, add_generation_prompt=False, tools=tools)
        spans: list[tuple[int, int]] = []
        turns: list[int] = []
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            before = self._jinja(messages[:i], add_generation_prompt=True, tools=tools)
            through = self._jinja(messages[: i + 1], add_generation_prompt=False, tools=tools)
            if not (through.startswith(before) and full.startswith(through)):
                raise ConfigError(
                    f"template '{self.name}': the chat template does not render conversations as prefixes of one "
                    "another (it changes earlier turns when a turn is added), so trained spans cannot be located; "
                    "choose a built-in template with --template"
                )
            start = len(before)
            # Whitespace after the end-of-turn marker is formatting, not something the model must learn to emit.
            end = len(through.rstrip())
            spans.append((start, max(start, end)))
            turns.append(i)
        return Rendered(full, spans, turns, [True] * len(spans))

    @property
    def _special(self) -> dict[str, str]:
        return getattr(self, "_special_tokens", {})


def answer_spans(rendered: Rendered, messages: list[Message]) -> list[tuple[int, int]]:
    """Character spans of the assistant messages' own text (content and reasoning) inside the spans `render`
    returned, in text order. The rest of a span is template markup: end-of-turn markers, role headers, think tags,
    tool-call syntax. Text a template changed (e.g. stripped) is matched stripped; a span of a message without tool
    calls in which neither is found counts as text as a whole."""
    out = []
    turns = rendered.turns or [i for i, m in enumerate(messages) if m.role == "assistant"]
    for (start, end), turn in zip(rendered.spans, turns):
        m = messages[turn] if 0 <= turn < len(messages) else None
        if m is None:
            continue
        found = []
        for piece in (m.reasoning, m.content):
            for text in (piece, piece.strip()) if piece else ():
                at = rendered.text.find(text, start, end) if text else -1
                if at >= 0:
                    found.append((at, at + len(text)))
                    break
        if not found and not m.tool_calls:
            found.append((start, end))
        out += sorted(found)
    return out


def conversation_problem(messages: list[Message], need_final_assistant: bool) -> tuple[int, str] | None:
    """(index of the message at fault, what is wrong) or None. Turns go user -> assistant -> user ...; an assistant
    turn with tool calls is followed by one or more tool results, and then by an assistant turn."""
    if not messages:
        return 0, "empty conversation"
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            return i, f"unknown role '{m.role}'; expected one of {ROLES}"
        if m.role == "system" and i != 0:
            return i, "a system message may only come first"
    first = 1 if messages[0].role == "system" else 0
    if len(messages) == first or messages[first].role != "user":
        return first, "a conversation must start with a user message (after an optional system message)"
    for i in range(first + 1, len(messages)):
        prev, m = messages[i - 1], messages[i]
        if m.role == "tool" and not (prev.role == "tool" or prev.tool_calls):
            return i, "a tool result with no preceding tool call (it must follow an assistant turn with tool_calls)"
        if m.role != "tool" and prev.tool_calls:
            return i, f"'{m.role}' turn after tool calls: the calls' tool results must come first"
        if m.role == prev.role and m.role in ("user", "assistant"):
            return i, f"two '{m.role}' turns in a row (turns alternate user/assistant)"
    last = messages[-1].role
    if need_final_assistant and last != "assistant":
        return len(messages) - 1, "a training conversation must end with an assistant message"
    if not need_final_assistant and last not in ("user", "tool"):
        return len(messages) - 1, "a prompt must end with a user or tool message"
    return None


def _check_messages(messages: list[Message], need_final_assistant: bool) -> None:
    problem = conversation_problem(messages, need_final_assistant)
    if problem is not None:
        raise DataError(f"message {problem[0]}: {problem[1]}")


@dataclass
class _Prepared:
    """Messages as the template will render them, where each came from in the row's messages (-1: added), and
    the tool definitions to pass to a template that renders them itself."""

    messages: list[Message]
    origin: list[int]
    tools: list[dict] | None


def _jinja_message(m: Message) -> dict[str, Any]:
    """A message the way Hugging Face chat templates read it."""
    d: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        d["tool_calls"] = [
            {"type": "function", **({"id": c.id} if c.id else {}), "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        d.update({k: v for k, v in (("tool_call_id", m.tool_call_id), ("name", m.name)) if v})
    if m.reasoning is not None:
        d["reasoning_content"] = m.reasoning
    return d


_EMPTY_THINK = re.compile(r"\s*<think>\s*</think>\s*")


def grade_reasoning(rendered: Rendered, messages: list[Message], train_on_reasoning: bool) -> Rendered:
    """Which part of each assistant turn is trained, as to thinking:

    * a turn with reasoning: the think block (from ``<think>`` through ``</think>`` and the whitespace after it,
      or the reasoning text alone where the template writes no tags) is trained with ``train_on_reasoning``;
    * a turn without reasoning, which the template opens with an empty ``<think></think>`` block of its own: that
      block is never trained, it is context (training begins at the answer after it).
    """
    spans, turns, opens = [], [], []
    for (s, e), t, o in zip(rendered.spans, rendered.turns, rendered.opens_turn):
        m = messages[t]
        segment = rendered.text[s:e]
        if m.reasoning:
            at = segment.find(m.reasoning)
            if at < 0:
                raise DataError(f"message {t}: the chat template does not render this turn's reasoning")
            if train_on_reasoning:
                pieces = [(s, e, o)]
            else:
                opening = segment.rfind("<think>", 0, at)
                block_start = opening if opening >= 0 else at
                closing = segment.find("</think>", at + len(m.reasoning))
                block_end = closing + len("</think>") if closing >= 0 else at + len(m.reasoning)
                while block_end < len(segment) and segment[block_end].isspace():
                    block_end += 1
                pieces = [(s, s + block_start, o), (s + block_end, e, False)]
        else:
            empty = _EMPTY_THINK.match(segment)
            pieces = [(s + empty.end(), e, False)] if empty else [(s, e, o)]
        for a, b, op in pieces:
            if b > a:
                spans.append((a, b))
                turns.append(t)
                opens.append(op)
    return Rendered(rendered.text, spans, turns, opens)


# ---- built-in templates -------------------------------------------------------------------------------------
BUILTIN: dict[str, dict[str, Any]] = {
    "chatml": dict(
        system_format="<|im_start|>system\n{content}<|im_end|>\n",
        user_format="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        assistant_end="<|im_end|>",
        assistant_after="\n",
        stop_strings=["<|im_end|>"],
    ),
    # Llama-2 chat: the system prompt sits inside the first [INST] block.
    "llama2": dict(
        user_format="{bos}[INST] {content} [/INST] ",
        assistant_end=" {eos}",
        system_merge="<<SYS>>\n{system}\n<</SYS>>\n\n{content}",
        stop_strings=["{eos}"],
    ),
    "mistral": dict(
        prefix="{bos}",
        user_format="[INST] {content} [/INST]",
        assistant_end="{eos}",
        stop_strings=["{eos}"],
    ),
    "alpaca": dict(
        prefix="",
        system_format="{content}\n\n",
        default_system=(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        ),
        user_format="### Instruction:\n{content}\n\n### Response:\n",
        assistant_end="{eos}",
        assistant_after="\n\n",
        stop_strings=["{eos}"],
    ),
    # No markup at all: the prompt is followed directly by the answer and EOS.
    "plain": dict(user_format="{content}", assistant_end="{eos}", stop_strings=["{eos}"]),
}


def _fill_specials(s: str, tokenizer) -> str:
    bos = getattr(tokenizer, "bos_token", None) or ""
    eos = getattr(tokenizer, "eos_token", None) or ""
    return s.replace("{bos}", bos).replace("{eos}", eos)


def _finalize(t: Template, tokenizer) -> Template:
    """Resolve {bos}/{eos} against the tokenizer and remember its special tokens for Jinja templates."""
    if t.kind == "pattern":
        for name in ("system_format", "user_format", "assistant_end", "assistant_after", "prefix"):
            setattr(t, name, _fill_specials(getattr(t, name), tokenizer))
        t.stop_strings = [_fill_specials(s, tokenizer) for s in t.stop_strings if _fill_specials(s, tokenizer)]
    t._special_tokens = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
    if t.kind == "jinja" and not t.stop_strings:
        t.stop_strings = _detect_jinja_stop(t, tokenizer)
    return t


def _detect_jinja_stop(t: Template, tokenizer) -> list[str]:
    """The end-of-turn marker a Jinja template puts after assistant content (e.g. <|im_end|>)."""
    probe = "PROBE_ANSWER"
    msgs = [Message("user", "hi"), Message("assistant", probe)]
    text = t._jinja(msgs, add_generation_prompt=False)
    at = text.rfind(probe)
    tail = text[at + len(probe) :].strip() if at >= 0 else ""
    stops = []
    if tail:
        vocab = tokenizer.get_vocab()
        # Prefer a single special token at the start of the tail (<|im_end|>, <|eot_id|>, </s>...).
        for tok in sorted(tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {})), key=len, reverse=True):
            if tok and tail.startswith(tok) and tok in vocab:
                stops.append(tok)
                break
        if not stops:
            stops.append(tail)
    if tokenizer.eos_token and tokenizer.eos_token not in stops:
        stops.append(tokenizer.eos_token)
    return stops


def prefix_template(
    user_prefix: str | None, assistant_prefix: str | None, sep_user: str = " ", sep_sys: str = "</s>",
    system: str | None = None,
) -> Template:
    user_prefix = user_prefix or ""
    assistant_prefix = assistant_prefix or ""
    stops = [sep_sys.strip()] if sep_sys.strip() else []
    return Template(
        name="prefix",
        kind="pattern",
        user_format=f"{user_prefix}{sep_user}{{content}}{sep_user}{assistant_prefix}{sep_user}",
        assistant_end=sep_sys,
        system_merge="{system}\n\n{content}",
        default_system=system,
        stop_strings=stops,
    )


def load_template(spec: str | dict | None, tokenizer, *, system: str | None = None, data_args=None) -> Template:
    """Resolve a template from a name, a full definition (dict), or the tokenizer's own chat template.

    With data_args given, user_prefix/assistant_prefix select the prefix template and `system` the default system
    prompt; an explicit name wins over the prefixes only if they are unset.
    """
    if data_args is not None:
        system = system if system is not None else data_args.system
        if data_args.user_prefix is not None or data_args.assistant_prefix is not None:
            if spec not in (None, "prefix"):
                raise ConfigError(
                    f"template: '{spec}' conflicts with user_prefix/assistant_prefix; set only one of them"
                )
            t = prefix_template(data_args.user_prefix, data_args.assistant_prefix, data_args.sep_user,
                                data_args.sep_sys, system)
            return _finalize(t, tokenizer)
    if isinstance(spec, dict):
        t = Template.from_dict(spec)
    elif spec in (None, "tokenizer", "default"):
        jinja = getattr(tokenizer, "chat_template", None)
        if isinstance(jinja, dict):
            jinja = jinja.get("default")
        if not jinja:
            if spec in ("tokenizer", "default"):
                raise ConfigError("template: the tokenizer has no chat template; pass --template chatml (or another)")
            t = Template(name="plain", kind="pattern", **BUILTIN["plain"])
        else:
            t = Template(name="tokenizer", kind="jinja", jinja=jinja)
    elif spec == "prefix":
        raise ConfigError("template: 'prefix' needs --user_prefix and --assistant_prefix")
    elif spec in BUILTIN:
        t = Template(name=spec, kind="pattern", **BUILTIN[spec])
    else:
        import difflib

        close = difflib.get_close_matches(str(spec), list(BUILTIN) + ["tokenizer", "prefix"], n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"template: unknown template '{spec}'{hint} Built-in: {sorted(BUILTIN)}")
    if system is not None:
        t.default_system = system
    if data_args is not None:
        t.tool_format = data_args.tool_format
    t.tool_mode()  # an unknown tool_format, or 'template' for a template without tool support, fails here
    return _finalize(t, tokenizer)


def save_template(t: Template, out_dir: str | Path) -> Path:
    path = Path(out_dir) / TEMPLATE_FILE
    path.write_text(json.dumps(t.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def load_saved_template(model_dir: str | Path, tokenizer) -> Template | None:
    """The template saved beside a checkpoint or output directory, or None when there is none."""
    path = Path(model_dir) / TEMPLATE_FILE
    if not path.is_file():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"cannot parse saved template: {e}", file=str(path), line=e.lineno) from None
    return _finalize(Template.from_dict(d), tokenizer)


def resolve_template(cfg, tokenizer, model_path: str | None) -> Template:
    """The template a run uses: the one asked for (--template, prefix flags); else the one saved with the model
    (an sftlab output dir); else the tokenizer's own. Every command that renders conversations starts here.
    ``cfg``: an `sftlab.config.Config` (not imported here: the configuration builds on this layer)."""
    d = cfg.data
    asked = d.template is not None or d.user_prefix is not None or d.assistant_prefix is not None
    if not asked:
        for candidate in (cfg.model.adapter_name_or_path, cfg.model.model_name_or_path, model_path):
            if candidate and Path(candidate).is_dir():
                saved = load_saved_template(candidate, tokenizer)
                if saved is not None:
                    if d.system is not None:
                        saved.default_system = d.system
                    if "tool_format" in cfg.explicit:
                        saved.tool_format = d.tool_format
                    return saved
    return load_template(d.template, tokenizer, data_args=d)
