"""An Ollama Modelfile beside the exported GGUF: FROM the file, the training template as Ollama's Go template, its
stop strings and sftlab's generation defaults, so that `ollama create NAME -f FILE.Modelfile` runs the model as it
was trained.

Ollama formats conversations with Go templates, not Jinja, so the template is written from its pattern form
(`chat_template.as_pattern`): every literal is a quoted Go string, the system prompt is held in a variable and
placed where sftlab places it, and the last user turn ends with the generation prompt as llama.cpp gets it.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from sftlab.config import GeneratingArguments
from sftlab.data.templates import Template
from sftlab.export.chat_template import as_pattern
from sftlab.files import write_atomically

__all__ = ["go_template", "modelfile_text", "write_modelfile"]

_PLACEHOLDER = re.compile(r"\{(content|system)\}")


def _go(fmt: str, variables: dict[str, str]) -> str:
    """A format string as Go template actions: literals as quoted strings, placeholders as the given snippets."""
    out = []
    for i, piece in enumerate(_PLACEHOLDER.split(fmt)):
        if i % 2:
            out.append(variables[piece])
        elif piece:
            out.append("{{ " + json.dumps(piece, ensure_ascii=False) + " }}")
    return "".join(out)


def go_template(pattern: Template, tail: str = "") -> str:
    """Ollama's TEMPLATE for a pattern template; `tail` is the generation-prompt text sftlab does not feed."""
    content = "{{ $m.Content }}"
    if not pattern.system_format:  # the system prompt is merged into the first user turn
        merged = _go(pattern.system_merge, {"system": "{{ $system }}", "content": content})
        content = "{{ if and $first $system }}" + merged + "{{ else }}{{ $m.Content }}{{ end }}"
    prompt_format = pattern.user_format[: len(pattern.user_format) - len(tail)] if tail else pattern.user_format
    system_block = ""
    if pattern.system_format:
        system_block = ("{{ if and $first $system }}" + _go(pattern.system_format, {"content": "{{ $system }}"})
                        + "{{ end }}")
    return (
        '{{ $system := "" }}{{ $first := true }}'
        + _go(pattern.prefix, {})
        + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        '{{ if eq $m.Role "system" }}{{ $system = $m.Content }}'
        '{{ else if eq $m.Role "user" }}' + system_block
        + "{{ if $last }}" + _go(prompt_format, {"content": content})
        + "{{ else }}" + _go(pattern.user_format, {"content": content}) + "{{ end }}"
        "{{ $first = false }}"
        '{{ else if eq $m.Role "assistant" }}{{ $m.Content }}'
        + _go(pattern.assistant_end + pattern.assistant_after, {})
        + "{{ end }}{{ end }}"
    )


def _quoted(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def modelfile_text(gguf_name: str, template: Template, tail: str, gen: GeneratingArguments) -> str:
    pattern = as_pattern(template)
    lines = [f"# Written by sftlab export: {gguf_name} with the chat template '{template.name}' it was trained with.",
             f"FROM ./{gguf_name}"]
    if pattern is None:
        lines.append("# The chat template is Jinja that has no Go-template equivalent here; Ollama reads the GGUF's.")
    else:
        lines.append(f'TEMPLATE """{go_template(pattern, tail)}"""')
        if pattern.default_system:
            lines.append(f'SYSTEM """{pattern.default_system}"""')
    for stop in dict.fromkeys(template.stop_strings):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    lines.append(f"PARAMETER temperature {gen.temperature if gen.do_sample else 0}")
    if gen.do_sample:
        lines += [f"PARAMETER top_p {gen.top_p}", f"PARAMETER top_k {gen.top_k}"]
    lines.append(f"PARAMETER repeat_penalty {gen.repetition_penalty}")
    lines.append(f"PARAMETER num_predict {gen.max_new_tokens}")
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, gguf_path: Path, template: Template, tail: str, gen: GeneratingArguments) -> Path:
    """Write the Modelfile atomically (temporary name, then rename)."""
    text = modelfile_text(gguf_path.name, template, tail, gen)
    write_atomically(path, text)
    return path
