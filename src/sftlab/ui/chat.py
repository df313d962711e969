"""Chat in the browser: the model is loaded and prompted as `sftlab chat` does (sftlab.chat), and the reply is
streamed piece by piece as the streamer of `sftlab.chat.generate_reply` writes it."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sftlab.chat import generate_reply, load_for_chat
from sftlab.config import parse_config
from sftlab.data.messages import Message
from sftlab.data.templates import load_saved_template
from sftlab.data.tokenize import encode_prompt, stop_token_ids

_DONE = object()


@dataclass
class Loaded:
    key: tuple
    model: object
    tokenizer: object
    template: object
    generating: object
    system: str | None


class _QueueWriter:
    """A text stream whose writes go to a queue (what the streamer prints, the browser receives)."""

    def __init__(self, q: queue.Queue):
        self.q = q

    def write(self, text: str) -> int:
        if text:
            self.q.put(text)
        return len(text)

    def flush(self) -> None:
        pass


class ChatService:
    """One loaded model at a time (the last one asked for), one reply generated at a time."""

    def __init__(self):
        self._loaded: Loaded | None = None
        self._lock = threading.Lock()

    def _load(self, model: str, template_dir: Path | None) -> Loaded:
        key = (model, str(template_dir))
        if self._loaded is None or self._loaded.key != key:
            self._loaded = None  # free the previous model before loading the next
            m, tok, template, cfg = load_for_chat(parse_config(["--model_name_or_path", model]))
            if template_dir is not None:  # the base model, prompted with the run's template
                template = load_saved_template(str(template_dir), tok) or template
            self._loaded = Loaded(key, m, tok, template, cfg.generating, cfg.data.system)
        return self._loaded

    def stream(self, model: str, messages: list[dict], max_new_tokens: int,
               template_dir: Path | None = None) -> Iterator[str]:
        """Text pieces of the reply to the conversation `messages` ({role, content}, the last one the user's)."""
        q: queue.Queue = queue.Queue()

        def work():
            try:
                with self._lock:
                    loaded = self._load(model, template_dir)
                    history = [Message(str(m["role"]), str(m["content"])) for m in messages]
                    if loaded.system and not any(m.role == "system" for m in history):
                        history.insert(0, Message("system", loaded.system))
                    ids = encode_prompt(loaded.tokenizer, loaded.template, history)
                    gen = loaded.generating
                    gen.max_new_tokens = max_new_tokens
                    generate_reply(loaded.model, loaded.tokenizer, ids, gen,
                                   stop_token_ids(loaded.tokenizer, loaded.template), _QueueWriter(q))
            except Exception as e:  # shown in the chat, not lost in the server log
                q.put(RuntimeError(f"{type(e).__name__}: {e}"))
            finally:
                q.put(_DONE)

        threading.Thread(target=work, daemon=True).start()
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, Exception):
                raise item
            yield item
