"""chat_loop with a scripted user, the real ChatML template and a tiny model whose generate() calls are recorded."""

from __future__ import annotations

import io

import pytest
import torch

from sftlab.chat import chat_loop, generate_reply
from sftlab.config import GeneratingArguments
from sftlab.data.templates import Message, load_template
from sftlab.data.tokenize import encode_prompt, stop_token_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_tokenizer_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import make_tiny_model_dir

    path = make_tiny_model_dir(
        tmp_path_factory.mktemp("chat") / "m", smol_tokenizer_dir, tie_word_embeddings=False, initializer_range=0.2
    )
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


class Recorder:
    """Wraps model.generate: keeps each call's prompt ids, reply ids, stop ids, and what `out` held on return."""

    def __init__(self, model, tok, out: io.StringIO):
        self.calls: list[dict] = []
        real = model.generate

        def spy(*args, **kwargs):
            result = real(*args, **kwargs)
            n = kwargs["input_ids"].shape[1]
            self.calls.append(
                dict(
                    prompt=kwargs["input_ids"][0].tolist(),
                    reply=result[0, n:].tolist(),
                    eos=list(kwargs["generation_config"].eos_token_id),
                    out_at_return=out.getvalue(),
                )
            )
            return result

        self.restore = lambda: delattr(model, "generate")  # back to the class method
        model.generate = spy


def scripted(lines):
    asked = []

    def input_fn(prompt: str) -> str:
        asked.append(prompt)
        if not lines:
            raise EOFError
        return lines.pop(0)

    return input_fn, asked


def reply_text(tok, ids, stops):
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    return tok.decode(ids[:cut], skip_special_tokens=True).strip()


def test_two_turns_reset_exit(tiny):
    model, tok = tiny
    template = load_template("chatml", tok)
    stops = stop_token_ids(tok, template)
    out = io.StringIO()
    rec = Recorder(model, tok, out)
    input_fn, asked = scripted(["Hello there", "What is Paris?", "/reset", "  ", "Tell me more", "/exit", "unread"])
    try:
        chat_loop(model, tok, template, GeneratingArguments(max_new_tokens=6), input_fn=input_fn, out=out)
    finally:
        rec.restore()

    assert len(asked) == 6  # stopped reading at /exit
    assert len(rec.calls) == 3  # blank line and commands generate nothing
    assert all(c["eos"] == stops for c in rec.calls)

    u1, u2, u3 = Message("user", "Hello there"), Message("user", "What is Paris?"), Message("user", "Tell me more")
    r1 = reply_text(tok, rec.calls[0]["reply"], stops)
    assert rec.calls[0]["prompt"] == encode_prompt(tok, template, [u1])
    # Second turn: the first exchange is in the prompt, as the template renders it.
    assert rec.calls[1]["prompt"] == encode_prompt(tok, template, [u1, Message("assistant", r1), u2])
    assert "Hello there" in tok.decode(rec.calls[1]["prompt"])
    # After /reset the history is gone.
    assert rec.calls[2]["prompt"] == encode_prompt(tok, template, [u3])
    assert "Hello there" not in tok.decode(rec.calls[2]["prompt"])

    # Streaming: each reply's text is already in `out` when generate() returns, i.e. written while generating.
    for call in rec.calls:
        assert reply_text(tok, call["reply"], stops) in call["out_at_return"]
    assert "Conversation cleared" in out.getvalue()


def test_system_prompt_eof_and_interrupt(tiny):
    model, tok = tiny
    template = load_template("chatml", tok)
    out = io.StringIO()
    rec = Recorder(model, tok, out)
    input_fn, asked = scripted(["Hi"])  # then EOFError
    try:
        chat_loop(model, tok, template, GeneratingArguments(max_new_tokens=3), input_fn=input_fn, out=out,
                  system="Be brief.")
    finally:
        rec.restore()
    assert len(asked) == 2
    assert rec.calls[0]["prompt"] == encode_prompt(
        tok, template, [Message("system", "Be brief."), Message("user", "Hi")]
    )

    def interrupt(prompt):
        raise KeyboardInterrupt

    chat_loop(model, tok, template, GeneratingArguments(max_new_tokens=3), input_fn=interrupt, out=io.StringIO())


def test_stop_token_is_not_streamed_and_ends_reply(tiny):
    model, tok = tiny
    template = load_template("chatml", tok)
    # Force <|im_end|> from the first step on: the reply is cut there (empty) and the marker is not shown.
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = io.StringIO()
    rec = Recorder(model, tok, out)
    bias = torch.zeros(model.config.vocab_size)
    bias[im_end] = 1e4
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    input_fn, _ = scripted(["Hello", "Again"])
    try:
        chat_loop(model, tok, template, GeneratingArguments(max_new_tokens=5), input_fn=input_fn, out=out)
    finally:
        handle.remove()
        rec.restore()
    assert rec.calls[0]["reply"][0] == im_end
    assert "<|im_end|>" not in out.getvalue()
    # The empty reply is still part of the history for the next turn.
    assert rec.calls[1]["prompt"] == encode_prompt(
        tok, template, [Message("user", "Hello"), Message("assistant", ""), Message("user", "Again")]
    )


def test_non_special_stop_token_is_not_streamed(tiny):
    model, tok = tiny
    (word,) = tok("hello", add_special_tokens=False).input_ids  # an ordinary (non-special) token
    bias = torch.zeros(model.config.vocab_size)
    bias[word] = 1e4
    out = io.StringIO()
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        reply = generate_reply(model, tok, tok("Hi").input_ids, GeneratingArguments(max_new_tokens=4), [word], out)
    finally:
        handle.remove()
    assert reply == ""
    assert "hello" not in out.getvalue()


def test_ctrl_c_during_reply_drops_that_turn(tiny):
    model, tok = tiny
    template = load_template("chatml", tok)
    out = io.StringIO()
    rec = Recorder(model, tok, out)
    spy = model.generate
    first = [True]

    def flaky(*args, **kwargs):
        if first[0]:
            first[0] = False
            raise KeyboardInterrupt
        return spy(*args, **kwargs)

    model.generate = flaky
    input_fn, _ = scripted(["Question one", "Question two", "/exit"])
    try:
        chat_loop(model, tok, template, GeneratingArguments(max_new_tokens=3), input_fn=input_fn, out=out)
    finally:
        rec.restore()
    assert "[reply interrupted]" in out.getvalue()
    # The interrupted question is not in the history of the next turn.
    assert rec.calls[0]["prompt"] == encode_prompt(tok, template, [Message("user", "Question two")])


def test_tools_in_the_prompt_a_call_kept_as_a_call_and_tool_results(tiny, monkeypatch):
    """With tools the prompt carries them; a reply that calls a tool is kept as that call, /tool answers it, and
    the next prompt is exactly the training-time prompt after a tool result."""
    import sftlab.chat as chat

    model, tok = tiny
    template = load_template("chatml", tok)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    replies = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "Sunny."]
    prompts = []

    def fake_reply(model, tokenizer, prompt_ids, gen_args, stop_ids, out):
        prompts.append(prompt_ids)
        out.write(replies[len(prompts) - 1] + "\n")
        return replies[len(prompts) - 1]

    monkeypatch.setattr(chat, "generate_reply", fake_reply)
    out = io.StringIO()
    input_fn, _ = scripted(["/tool early", "Weather in Paris?", "/tool 21 degrees", "/exit"])
    chat_loop(model, tok, template, GeneratingArguments(), input_fn=input_fn, out=out, tools=tools)

    assert "There is no tool call to answer." in out.getvalue() and replies[0] in out.getvalue()
    from sftlab.data.templates import ToolCall

    u = Message("user", "Weather in Paris?")
    call = Message("assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}),))
    assert prompts[0] == encode_prompt(tok, template, [u], tools)
    assert prompts[1] == encode_prompt(tok, template, [u, call, Message("tool", "21 degrees")], tools)
    assert "<tools>" in tok.decode(prompts[0]) and "<tool_response>\n21 degrees\n</tool_response>" in tok.decode(prompts[1])
