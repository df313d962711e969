"""The Ollama Modelfile: FROM, the template as a Go template, stop strings and generation defaults.

Ollama (and Go) are not installed here, so the Go template is checked by reading its literals back in order: for a
one-turn conversation the strings of the user branch (last turn) around the content must give sftlab's prompt."""

from __future__ import annotations

import json
import re

from sftlab.config import GeneratingArguments
from sftlab.data.templates import Message, _finalize, load_template, prefix_template
from sftlab.export.chat_template import generation_prompt_tail
from sftlab.export.modelfile import go_template, modelfile_text


def literals(go: str) -> list[str]:
    return [json.loads(s) for s in re.findall(r'\{\{ ("(?:[^"\\]|\\.)*") \}\}', go)]


def last_user_branch(go: str) -> str:
    """The `{{ if $last }} ... {{ else }}` branch of a user turn without a system prompt, content marked as <C>."""
    go = re.sub(r"\{\{ if and \$first \$system \}\}.*?\{\{ else \}\}(\{\{ \$m\.Content \}\})\{\{ end \}\}", r"\1", go)
    branch = go.split("{{ if $last }}", 1)[1].split("{{ else }}", 1)[0]
    return "".join(json.loads(s) if s.startswith('"') else "<C>"
                   for s in re.findall(r'\{\{ ("(?:[^"\\]|\\.)*"|\$m\.Content) \}\}', branch))


def test_go_template_of_chatml_wraps_the_content_as_sftlab_does(smol_tokenizer):
    t = load_template("chatml", smol_tokenizer)
    go = go_template(t, generation_prompt_tail(t, smol_tokenizer))
    want = t.render_prompt([Message("user", "<C>")])
    assert last_user_branch(go) == want
    assert '{{ if eq $m.Role "system" }}{{ $system = $m.Content }}' in go
    assert "<|im_start|>system\n" in literals(go)


def test_go_template_drops_the_space_the_answer_starts_with(smol_tokenizer):
    t = _finalize(prefix_template("<s>[INST]", "[/INST]", " ", "</s>"), smol_tokenizer)
    go = go_template(t, generation_prompt_tail(t, smol_tokenizer))
    assert last_user_branch(go) == "<s>[INST] <C> [/INST]"  # the trained answer starts with " answer"


def test_modelfile_has_from_template_system_stops_and_greedy_defaults(smol_tokenizer):
    t = load_template("tokenizer", smol_tokenizer)
    text = modelfile_text("m.gguf", t, "", GeneratingArguments(max_new_tokens=64))
    lines = text.splitlines()
    assert lines[1] == "FROM ./m.gguf" and lines[2].startswith('TEMPLATE """') and lines[2].endswith('"""')
    assert any(line.startswith('SYSTEM """You are a helpful AI assistant named SmolLM') for line in lines)
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert "PARAMETER temperature 0" in lines and "PARAMETER num_predict 64" in lines


def test_a_template_without_go_form_leaves_ollama_the_ggufs_own(smol_tokenizer):
    from sftlab.data.templates import Template

    t = _finalize(Template(name="shout", kind="jinja", jinja="{% for m in messages %}{{ m['content'] | upper }}"
                                                            "{% endfor %}"), smol_tokenizer)
    text = modelfile_text("m.gguf", t, "", GeneratingArguments())
    assert "TEMPLATE" not in text and "Ollama reads the GGUF's" in text
