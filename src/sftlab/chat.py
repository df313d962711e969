"""Interactive multi-turn chat in the terminal, with replies streamed as they are generated.

Each turn re-encodes the whole conversation with the same template and `encode_prompt` used for training and
evaluation, so the model sees exactly the prompt format it was fine-tuned on (no KV cache is kept across turns:
re-encoding is cheap for a chat-sized history and can never drift from the template).

Commands: ``/reset`` forgets the conversation, ``/exit`` leaves (so do end-of-input and Ctrl-C at the prompt),
``/tool TEXT`` answers the model's tool call with TEXT as the tool result (then the model writes its next turn).
With tools given (``sftlab chat --tools tools.json``) they are rendered into every prompt; a reply that calls tools
is shown as the text the model wrote, and is kept in the history as those calls.
Ctrl-C while a reply is being written abandons that reply (it is not added to the history) and returns to the
prompt.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from sftlab.config import Config, GeneratingArguments
from sftlab.data.messages import Message
from sftlab.data.templates import Template
from sftlab.data.tokenize import encode_prompt, stop_token_ids
from sftlab.data.tools import parse_tool_calls
from sftlab.eval.generate import build_generation_config, cut_at_stop, model_device, pad_token_id

__all__ = ["chat_loop", "generate_reply", "load_for_chat"]

RESET, EXIT, TOOL = "/reset", "/exit", "/tool"
HELP = f"Chat started. {RESET} clears the conversation, {EXIT} (or Ctrl-D) leaves.\n"
TOOL_HELP = f"Tools are on: answer a tool call with {TOOL} RESULT.\n"


def _make_streamer(tokenizer, out: TextIO, stop_ids: list[int]):
    """A TextStreamer that writes to `out` (not print) and never shows the stop token itself.

    transformers' TextStreamer already buffers tokens until they decode to whole words, so multi-token
    characters (UTF-8 split across byte tokens) are never printed half-way.
    """
    from transformers import TextStreamer

    stops = set(stop_ids)

    class _OutStreamer(TextStreamer):
        def put(self, value):
            if not self.next_tokens_are_prompt:
                # A stop token that is not marked "special" would otherwise be printed (e.g. "</s>" as text).
                flat = value.reshape(-1).tolist()
                if any(t in stops for t in flat):
                    value = value.new_tensor([t for t in flat if t not in stops])
                    if value.numel() == 0:
                        return
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            if stream_end:
                out.write("\n")
            out.flush()

    return _OutStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def load_for_chat(cfg: Config):
    """(model, tokenizer, template, cfg) for chatting with cfg.model.model_name_or_path (an sftlab output dir uses the
    template it was trained with); the same loading as `sftlab chat`."""
    from sftlab.models.load import load_model, load_tokenizer, resolve_model_path
    from sftlab.data.templates import resolve_template

    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    model, _ = load_model(cfg.model, None, for_training=False, bf16=cfg.training.bf16)
    return model, tok, resolve_template(cfg, tok, path), cfg


def generate_reply(
    model, tokenizer, prompt_ids: list[int], gen_args: GeneratingArguments, stop_ids: list[int], out: TextIO
) -> str:
    """Generate one reply for `prompt_ids`, streaming its text to `out`; returns the reply (cut at the stop)."""
    import torch

    pad_id = pad_token_id(tokenizer, stop_ids)
    config = build_generation_config(gen_args, stop_ids, pad_id)
    device = model_device(model)
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    model.eval()
    with torch.inference_mode():
        generated = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            generation_config=config,
            streamer=_make_streamer(tokenizer, out, stop_ids),
        )
    reply_ids, _ = cut_at_stop(generated[0, input_ids.shape[1] :].tolist(), stop_ids)
    return tokenizer.decode(reply_ids, skip_special_tokens=True).strip()


def chat_loop(
    model,
    tokenizer,
    template: Template,
    gen_args: GeneratingArguments,
    input_fn: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    system: str | None = None,
    tools: list[dict] | None = None,
) -> None:
    """Read user turns from `input_fn` until /exit or end of input, answering each with the whole history."""
    stops = stop_token_ids(tokenizer, template)
    history: list[Message] = []
    out.write(HELP + (TOOL_HELP if tools else ""))
    out.flush()
    while True:
        try:
            line = input_fn("User: ")
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            return
        if text == RESET:
            history.clear()
            out.write("Conversation cleared.\n")
            continue

        if text.split(maxsplit=1)[0] == TOOL:
            if not (history and (history[-1].tool_calls or history[-1].role == "tool")):
                out.write("There is no tool call to answer.\n")
                continue
            user = Message("tool", text[len(TOOL):].strip())
        else:
            user = Message("user", text)
        messages = ([Message("system", system)] if system else []) + history + [user]
        prompt_ids = encode_prompt(tokenizer, template, messages, tools)
        out.write("Assistant: ")
        out.flush()
        try:
            reply = generate_reply(model, tokenizer, prompt_ids, gen_args, stops, out)
        except KeyboardInterrupt:
            # Keep the history consistent: a half-written answer is dropped together with its question.
            out.write("\n[reply interrupted]\n")
            continue
        history += [user, assistant_turn(reply)]


def assistant_turn(reply: str) -> Message:
    """The reply as an assistant message: its tool calls, when it makes any that parse, and the text before them."""
    calls = parse_tool_calls(reply)
    if not calls:
        return Message("assistant", reply)
    return Message("assistant", reply.split("<tool_call>")[0].strip(), tool_calls=tuple(calls))
