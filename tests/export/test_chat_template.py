"""The Jinja written into the GGUF, rendered the way llama.cpp clients render it, against sftlab's own renderer and
`encode_prompt`: the same text for whole conversations, the same ids for generation prompts."""

from __future__ import annotations

import pytest

from sftlab.data.templates import Message, load_template, prefix_template, _finalize
from sftlab.data.tokenize import encode_prompt
from sftlab.export.chat_template import as_pattern, generation_prompt_tail, to_jinja

CONVERSATIONS = [
    [Message("user", "What is 2+2?"), Message("assistant", "4")],
    [Message("system", "Answer in JSON."), Message("user", "Name?"), Message("assistant", '{"name": "Bo"}')],
    [Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Capital of France?"),
     Message("assistant", "Paris, of course.")],
    [Message("system", "Be brief."), Message("user", "a b"), Message("assistant", " spaced "),
     Message("user", "ünïcödé\nline"), Message("assistant", "ok")],
]


def client_render(jinja: str, messages, add_generation_prompt: bool, tokenizer) -> str:
    """What llama-cpp-python's Jinja2ChatFormatter (and transformers) do with a GGUF chat template."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    return env.from_string(jinja).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=add_generation_prompt,
        bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
    )


def templates(tok):
    out = {name: load_template(name, tok) for name in ("chatml", "llama2", "mistral", "alpaca", "plain")}
    if tok.chat_template:
        out["tokenizer"] = load_template("tokenizer", tok)
        out["tokenizer+system"] = load_template("tokenizer", tok, system="You answer tersely.")
    out["chatml+system"] = load_template("chatml", tok, system="You answer tersely.")
    out["prefix"] = _finalize(prefix_template("<s>[INST]", "[/INST]", " ", "</s>"), tok)
    out["prefix+system"] = _finalize(prefix_template("USER:", "ASSISTANT:", " ", "\n", system="Be kind."), tok)
    return out


@pytest.fixture(params=["smol", "sp"])
def tok(request, smol_tokenizer, sp_tokenizer):
    return smol_tokenizer if request.param == "smol" else sp_tokenizer


def test_whole_conversations_render_to_the_training_text(tok):
    for name, t in templates(tok).items():
        jinja = to_jinja(t, tok)
        for conv in CONVERSATIONS:
            assert client_render(jinja, conv, False, tok) == t.render(conv).text, (name, conv)


def test_generation_prompts_tokenize_to_the_predict_ids(tok):
    for name, t in templates(tok).items():
        jinja = to_jinja(t, tok)
        for conv in CONVERSATIONS:
            prompt = conv[:-1]
            text = client_render(jinja, prompt, True, tok)
            assert tok(text, add_special_tokens=False)["input_ids"] == encode_prompt(tok, t, prompt), (name, prompt)


def test_the_space_before_an_answer_is_left_to_the_answer(smol_tokenizer):
    t = load_template("llama2", smol_tokenizer)
    assert generation_prompt_tail(t, smol_tokenizer) == " "  # "[/INST] " + "Paris" -> "[/INST]", " Paris"
    text = client_render(to_jinja(t, smol_tokenizer), [Message("user", "Q")], True, smol_tokenizer)
    assert text.endswith("Q [/INST]")
    assert generation_prompt_tail(load_template("chatml", smol_tokenizer), smol_tokenizer) == ""


def test_a_jinja_template_decomposes_into_the_pattern_it_renders(smol_tokenizer):
    t = load_template("tokenizer", smol_tokenizer)
    p = as_pattern(t)
    assert p is not None and p.kind == "pattern"
    assert p.default_system and "SmolLM" in p.default_system  # the tokenizer template's own default
    assert p.user_format == "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"
    for conv in CONVERSATIONS:
        assert p.render(conv).text == t.render(conv).text


def test_a_jinja_template_that_rewrites_content_has_no_pattern(smol_tokenizer):
    from sftlab.data.templates import Template

    t = _finalize(Template(name="shout", kind="jinja", jinja=(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}")), smol_tokenizer)
    assert as_pattern(t) is None
