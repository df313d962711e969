"""Rendering by conversation shape (sftlab.data.shapes) against direct Jinja renders of the same template."""

from __future__ import annotations

import random

import pytest

from sftlab.data.shapes import prints_content_only, render_by_shape
from sftlab.data.templates import Message, Template, _finalize, load_template
from sftlab.errors import ConfigError, DataError

# A Llama-3-like template: a default system turn, bos, and header tokens; contents printed with '+'.
LLAMA3ISH = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}{{ '<|start_header_id|>system<|end_header_id|>\n\n"
    "Default.<|eot_id|>' }}{% endif %}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-like: refuses a conversation that does not alternate; contents joined with '~'.
STRICT = (
    "{% for message in messages %}{% if (message.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate') }}{% endif %}{% if message.role == 'user' %}"
    "{{ '[INST] ' ~ message.content ~ ' [/INST]' }}{% else %}{{ message.content ~ eos_token }}{% endif %}{% endfor %}"
)
TRIMS = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
BRANCHES = ("{% for m in messages %}{% if m.content.startswith('x') %}X{% endif %}{{ m.role + ':' + m.content }}\n"
            "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def conversations(seed: int, n: int):
    rng = random.Random(seed)
    words = ["hi", " there", "x-ray", "\n", "  ", "Paris", "<b>", "é", "{{ not jinja }}", "\ue000 0"]
    for _ in range(n):
        msgs = [Message("system", "".join(rng.choices(words, k=3)))] if rng.random() < 0.4 else []
        for _ in range(rng.randint(1, 3)):
            msgs += [Message("user", "".join(rng.choices(words, k=rng.randint(1, 6)))),
                     Message("assistant", "".join(rng.choices(words, k=rng.randint(1, 6))))]
        yield msgs


def jinja(source, tok):
    return _finalize(Template(name="t", kind="jinja", jinja=source), tok)


def test_which_templates_only_print_contents(smol_tokenizer):
    assert prints_content_only(smol_tokenizer.chat_template)
    assert prints_content_only(LLAMA3ISH) and prints_content_only(STRICT)
    assert not prints_content_only(TRIMS) and not prints_content_only(BRANCHES)
    assert not prints_content_only("{% set c = messages[0]['content'] %}{{ c }}")
    assert prints_content_only("{% for m in messages %}{{ m['role'] ~ m['content'] }}{% endfor %}")


def direct(t: Template, msgs: list[Message], add_generation_prompt: bool) -> str:
    return t.jinja_render([{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt)


def by_shape(t: Template, msgs: list[Message], add_generation_prompt: bool) -> str | None:
    return render_by_shape(t, [{"role": m.role, "content": m.content} for m in msgs], add_generation_prompt)


def outcome(fn, *args):
    """The result, or the error message when rendering is refused."""
    try:
        return fn(*args)
    except (DataError, ConfigError) as e:
        return str(e)


@pytest.mark.parametrize("source", ["smol", LLAMA3ISH, STRICT, TRIMS, BRANCHES, "JSON"])
def test_same_text_as_jinja_for_every_prefix(source, smol_tokenizer):
    if source == "JSON":  # prints whole messages as JSON: contents are escaped, so no substitution
        source = "{% for m in messages %}{{ m | tojson }}{% endfor %}"
    t = load_template(None, smol_tokenizer) if source == "smol" else jinja(source, smol_tokenizer)
    substituted = 0
    for msgs in conversations(sum(map(ord, source)), 40):
        for k in range(1, len(msgs) + 1):
            for gen in (False, True):
                got = outcome(by_shape, t, msgs[:k], gen)
                if got is not None:
                    substituted += 1
                    assert got == outcome(direct, t, msgs[:k], gen)
    assert (substituted > 0) == (prints_content_only(t.jinja) and "tojson" not in t.jinja)
    # And through Template.render / render_prompt, which use it: the same as with substitution switched off.
    import sftlab.data.shapes as shapes

    fast = [outcome(t.render, m) for m in conversations(5, 30)]
    prompts = [outcome(t.render_prompt, m[:-1]) for m in conversations(5, 30)]
    real = shapes.render_by_shape
    shapes.render_by_shape = lambda *a: None
    try:
        assert fast == [outcome(t.render, m) for m in conversations(5, 30)]
        assert prompts == [outcome(t.render_prompt, m[:-1]) for m in conversations(5, 30)]
    finally:
        shapes.render_by_shape = real


def test_refusals_raise_as_the_template_does(smol_tokenizer):
    t = jinja(STRICT, smol_tokenizer)
    sys_first = [Message("system", "s"), Message("user", "u"), Message("assistant", "a")]
    for _ in range(2):  # the refusal is remembered for the shape and raised again
        with pytest.raises(DataError, match="roles must alternate"):
            t.render(sys_first)
    with pytest.raises(DataError, match="roles must alternate"):
        direct(t, sys_first, False)
