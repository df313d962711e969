"""sftlab's chat template as a Jinja chat template for the GGUF metadata, and as a plain pattern for Ollama.

llama.cpp clients (llama-cpp-python, `llama-server --jinja`, LM Studio) format a conversation by rendering the GGUF's
``tokenizer.chat_template`` with ``messages``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``, then
tokenizing the text with special tokens parsed. For that to reproduce sftlab's prompt token for token:

* a pattern template (built-in or LocalRQA prefix) is written out as Jinja that emits exactly its strings, every
  literal as a quoted string expression so that Jinja's whitespace control cannot touch it;
* a Jinja template (the tokenizer's own) is kept as it is, with sftlab's default system prompt put in front;
* the generation prompt loses the trailing text that sftlab's `encode_prompt` leaves out (a space that the
  tokenizer merges into the answer's first token: ``[/INST] `` -> ``[/INST]``), because the model was trained to
  write that space as part of its answer.
"""

from __future__ import annotations

import json
import re

from sftlab.data.messages import Message
from sftlab.data.templates import Template
from sftlab.data.tokenize import _prompt_ids_and_end
from sftlab.errors import ConfigError

__all__ = ["as_pattern", "generation_prompt_tail", "to_jinja"]

_PLACEHOLDER = re.compile(r"\{(content|system)\}")


def generation_prompt_tail(template: Template, tokenizer) -> str:
    """The end of the generation prompt that sftlab does not feed the model (it belongs to the answer's first
    token), e.g. ``" "`` for ``[/INST] ``; usually empty."""
    text = template.render_prompt([Message("user", "Hi")])
    _, end = _prompt_ids_and_end(tokenizer, text)
    return text[end:]


def _lit(s: str) -> str:
    return "{{ " + json.dumps(s, ensure_ascii=False) + " }}" if s else ""


def _expr(fmt: str, variables: dict[str, str]) -> str:
    """A format string with {content}/{system} as one Jinja string expression (pieces joined with ~)."""
    parts = []
    for i, piece in enumerate(_PLACEHOLDER.split(fmt)):
        if i % 2:
            parts.append(variables[piece])
        elif piece:
            parts.append(json.dumps(piece, ensure_ascii=False))
    return " ~ ".join(parts) or '""'


def _emit(fmt: str, variables: dict[str, str]) -> str:
    return "{{ " + _expr(fmt, variables) + " }}" if fmt else ""


def _pattern_jinja(t: Template, tail: str) -> str:
    if not t.user_format.endswith(tail):
        raise ConfigError(f"template '{t.name}': cannot write the generation prompt for llama.cpp: the dropped text "
                          f"{tail!r} is not the end of the user turn {t.user_format!r}")
    prompt_format = t.user_format[: len(t.user_format) - len(tail)] if tail else t.user_format
    default = json.dumps(t.default_system, ensure_ascii=False) if t.default_system else "none"
    if t.system_format:
        system_part = _emit(t.system_format, {"content": "ns.system"})
        merge = ""
    else:
        system_part = ""
        merge = "{% set content = " + _expr(t.system_merge, {"system": "ns.system", "content": "content"}) + " %}"
    user = {"content": "content"}
    return (
        "{% set ns = namespace(system=" + default + ", first=true) %}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set ns.system = messages[0]['content'] %}{% endif %}"
        + _lit(t.prefix)
        + "{% for message in messages %}"
        "{% if message['role'] == 'user' %}"
        "{% set content = message['content'] %}"
        "{% if ns.first and ns.system %}" + system_part + merge + "{% endif %}"
        "{% set ns.first = false %}"
        "{% if loop.last and add_generation_prompt %}" + _emit(prompt_format, user)
        + "{% else %}" + _emit(t.user_format, user) + "{% endif %}"
        "{% elif message['role'] == 'assistant' %}"
        "{{ message['content'] }}" + _lit(t.assistant_end + t.assistant_after)
        + "{% endif %}"
        "{% endfor %}"
    )


def _jinja_jinja(t: Template, tail: str) -> str:
    body = t.jinja or ""
    if tail:
        # Render the original, then drop the tail from a generation prompt (a block `set` captures the output).
        body = ("{% set sftlab_out %}" + body + "{% endset %}"
                "{% if add_generation_prompt and sftlab_out.endswith(" + json.dumps(tail) + ") %}"
                "{{ sftlab_out[:" + str(-len(tail)) + "] }}{% else %}{{ sftlab_out }}{% endif %}")
    if t.default_system:
        system = json.dumps(t.default_system, ensure_ascii=False)
        body = ("{% if messages and messages[0]['role'] != 'system' %}"
                "{% set messages = [{'role': 'system', 'content': " + system + "}] + messages %}{% endif %}" + body)
    return body


def to_jinja(template: Template, tokenizer) -> str:
    """The Jinja chat template that renders conversations exactly as `template` does for training and predict."""
    tail = generation_prompt_tail(template, tokenizer)
    if template.kind == "jinja":
        return _jinja_jinja(template, tail)
    return _pattern_jinja(template, tail)


# ---- a Jinja template as a pattern (for Ollama's Go templates) ---------------------------------------------------
_S, _U1, _A1, _U2 = "SFTLABSYSTEM", "SFTLABQUESTION", "SFTLABANSWER", "SFTLABFOLLOWUP"


def as_pattern(template: Template) -> Template | None:
    """The template as a pattern template (prefix, system block, user turn, assistant end), or None when the Jinja
    template does not decompose that way. Every candidate is checked by rendering five conversations both ways."""
    if template.kind == "pattern":
        return template
    try:
        with_system = template.render_prompt([Message("system", _S), Message("user", _U1)])
        plain = template.render_prompt([Message("user", _U1)])
        two = template.render_prompt([Message("user", _U1), Message("assistant", _A1), Message("user", _U2)])
    except Exception:
        return None
    if any(s.count(_U1) != 1 for s in (with_system, plain, two)) or with_system.count(_S) != 1:
        return None
    gen = two[two.index(_U1) + len(_U1): two.index(_A1)]
    between = two[two.index(_A1) + len(_A1): two.index(_U2)]
    before = [with_system[: with_system.index(_U1)], plain[: plain.index(_U1)], two[: two.index(_U2)]]
    common = _common_suffix(before)
    for k in range(len(common), -1, -1):
        candidate = _candidate(template, common[len(common) - k:], gen, between, before)
        if candidate is not None and _renders_alike(candidate, template):
            return candidate
    return None


def _common_suffix(texts: list[str]) -> str:
    n = 0
    while all(len(t) > n for t in texts) and len({t[len(t) - 1 - n] for t in texts}) == 1:
        n += 1
    return texts[0][len(texts[0]) - n:] if n else ""


def _candidate(template: Template, user_open: str, gen: str, between: str, before: list[str]) -> Template | None:
    if not between.endswith(user_open):
        return None
    system_block = before[0][: len(before[0]) - len(user_open)]
    no_system = before[1][: len(before[1]) - len(user_open)]
    head, _, rest = system_block.partition(_S)
    default = None
    if no_system:
        if not (no_system.startswith(head) and no_system.endswith(rest)) or len(no_system) < len(head) + len(rest):
            return None
        default = no_system[len(head): len(no_system) - len(rest)]
    end = between[: len(between) - len(user_open)]
    return Template(
        name=template.name, kind="pattern", system_format=head + "{content}" + rest,
        user_format=user_open + "{content}" + gen, assistant_end=end, default_system=default,
        stop_strings=list(template.stop_strings),
    )


def _renders_alike(pattern: Template, template: Template) -> bool:
    convs = [
        [Message("user", "q")],
        [Message("system", "s"), Message("user", "q")],
        [Message("user", "q"), Message("assistant", "a"), Message("user", "r")],
        [Message("system", "s"), Message("user", "q"), Message("assistant", "a"), Message("user", "r")],
    ]
    try:
        for c in convs:
            if pattern.render_prompt(c) != template.render_prompt(c):
                return False
            full = c + [Message("assistant", "b")]
            if pattern.render(full).text != template.render(full).text:
                return False
    except Exception:
        return False
    return True
