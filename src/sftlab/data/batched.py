"""Rows -> tokenized examples in batches, over several processes, with a progress bar.

The per-row reference is `dataset.encode_row`. Here a batch of rows is rendered (the chat template compiled once
per process, and
rendered once per conversation shape: sftlab.data.shapes), the full texts and the generation prompts are tokenized by the fast tokenizer's batch call (offsets
included), and each row is then labelled and fitted to cutoff_len by the same functions the reference uses
(`tokenize.label_tokens`, `fitting.fit_encoded`), so the examples are the same token for token (tested in
tests/data/test_batched.py). Rows longer than cutoff_len under keep_answer are re-encoded by the reference, as
they drop context one exchange at a time.

`encode_stream` feeds chunks of rows to `preprocessing_num_workers` processes with a bounded number in flight,
so memory does not grow with the data; every chunk comes back as flat int32 arrays, in order.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from sftlab.data import formats as F
from sftlab.data.facts import row_facts
from sftlab.data.fitting import fit_encoded, naming_row
from sftlab.data.loader import Row
from sftlab.data.templates import Template
from sftlab.data.tokenize import IGNORE_INDEX, Encoded, _PROBE, label_tokens, prepare_messages, prompt_cut

CHUNK_ROWS = 512
# Progress is shown once the work has run this long (short runs stay quiet).
PROGRESS_AFTER_S = 3.0


@dataclass
class EncodedChunk:
    """The kept examples of a chunk of rows as flat arrays, and what happened to the others."""

    input_ids: np.ndarray  # int32, the kept examples one after another
    labels: np.ndarray  # int32, aligned with input_ids
    lengths: np.ndarray  # int64, tokens per kept example
    rows: int = 0
    facts: np.ndarray | None = None  # int32 (rows, len(facts.FACT_COLUMNS)): every row's `facts.row_facts`
    truncated: int = 0
    formats: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)

    def examples(self) -> Iterator[dict]:
        start = 0
        for n in self.lengths.tolist():
            yield {"input_ids": self.input_ids[start:start + n].tolist(), "labels": self.labels[start:start + n].tolist()}
            start += n


def tokenize_batch(tokenizer, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, offsets) of each text without special tokens, in one batch call of the fast tokenizer."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(list(i), [tuple(o) for o in offs]) for i, offs in zip(enc["input_ids"], enc["offset_mapping"])]


def encode_batch(pairs: list[tuple[str, Row]], tokenizer, template: Template,
                 settings, facts: list | None = None) -> list[tuple[Encoded | None, str | None]]:
    """Each (format, row) -> (example, None) or (None, reason dropped): the same results as `encode_row` (with
    its answer mask). `facts`, when given, receives each row's `facts.row_facts`."""
    texts: list[str] = []
    prompts: list[str] = []
    plans: list[tuple] = []  # (fmt, row, Prepared or None, index into prompts or -1)
    turns: list[int] = []  # assistant messages per row (1 for `text` rows)
    for fmt, row in pairs:
        if fmt == "text":
            texts.append(F.row_text(row))
            plans.append((fmt, row, None, -1))
            turns.append(1)
            continue
        messages = F.to_messages(fmt, row, settings.options)
        turns.append(sum(m.role == "assistant" for m in messages))
        with naming_row(row):
            prep = prepare_messages(template, messages, settings.train_on, F.row_tools(row),
                                    settings.train_on_reasoning, with_answer_mask=True)
        p = -1
        if prep.prompt_text is not None and prep.rendered.spans:
            p = len(prompts)
            prompts.append(prep.prompt_text)
        texts.append(prep.rendered.text)
        plans.append((fmt, row, prep, p))
    full = tokenize_batch(tokenizer, texts)
    probed = probe_prompts(tokenizer, prompts, [(texts[i], full[i]) for i, plan in enumerate(plans) if plan[3] >= 0])
    eos = tokenizer.eos_token_id
    out = []
    for k, ((fmt, row, prep, p), (ids, offs)) in enumerate(zip(plans, full)):
        if fmt == "text":
            ids = list(ids) + ([eos] if eos is not None else [])
            enc = Encoded(ids, list(ids))
        else:
            prompt = prompt_cut(len(prompts[p]), *probed[p]) if p >= 0 else None
            enc = label_tokens(ids, offs, prep.rendered, prep.train_all, prompt, prep.answer_chars)
        with naming_row(row):
            out.append(fit_encoded(fmt, row, enc, tokenizer, template, settings, with_answer_mask=True))
        if facts is not None:
            facts.append(row_facts(fmt, enc, out[-1][0], turns[k], eos))
    return out


def _split_specials(tokenizer) -> dict[str, int]:
    """Special tokens the tokenizer splits the text on before anything else (not normalized, no strip options):
    the text on either side of one is tokenized on its own."""
    out = {}
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if (getattr(t, "special", False) and not getattr(t, "normalized", True) and not getattr(t, "lstrip", False)
                and not getattr(t, "rstrip", False) and not getattr(t, "single_word", False) and t.content):
            out[t.content] = i
    return out


def probe_prompts(tokenizer, prompts: list[str], texts: list[tuple[str, tuple]]) -> list[tuple[list, list]]:
    """The tokens of each ``prompt + _PROBE`` (what `tokenize._prompt_ids_and_end` tokenizes), for prompts that
    begin the text tokenized beside them: the tokens up to the prompt's last special token are taken from the
    text's tokens (the tokenizer splits on that token first, so what precedes it is tokenized the same), and only
    ``special + rest of the prompt + _PROBE`` is tokenized. Prompts without such a token are tokenized whole."""
    import bisect

    specials = _split_specials(tokenizer)
    tails: list[str] = []
    plan: list[tuple] = []  # (kind, data): ("tail", (k, cut, ids, offs)) or ("whole", None)
    for prompt, (text, (ids, offs)) in zip(prompts, texts):
        cut, special = max(((prompt.rfind(sp), sp) for sp in specials), default=(-1, ""))
        k = -1
        if cut >= 0 and text.startswith(prompt):
            k = bisect.bisect_left(offs, cut, key=lambda o: o[0])
            if not (k < len(offs) and offs[k] == (cut, cut + len(special)) and ids[k] == specials[special]):
                k = -1
        if k < 0:
            plan.append(("whole", None))
            continue
        plan.append(("tail", (k, cut, specials[special], len(special), ids, offs, prompt)))
        tails.append(prompt[cut:] + _PROBE)
    tail_tokens = iter(tokenize_batch(tokenizer, tails))
    whole = iter(tokenize_batch(tokenizer, [p + _PROBE for p, (kind, _) in zip(prompts, plan) if kind == "whole"]))
    out = []
    for kind, data in plan:
        if kind == "whole":
            out.append(next(whole))
            continue
        k, cut, special_id, n, ids, offs, prompt = data
        t_ids, t_offs = next(tail_tokens)
        if not (t_ids and t_ids[0] == special_id and tuple(t_offs[0]) == (0, n)):
            out.append(tokenize_batch(tokenizer, [prompt + _PROBE])[0])  # not split first after all: the whole prompt
            continue
        out.append((list(ids[:k]) + list(t_ids), list(offs[:k]) + [(s + cut, e + cut) for s, e in t_offs]))
    return out


def encode_chunk(pairs: list[tuple[str, Row]], tokenizer, template: Template, settings) -> EncodedChunk:
    """A chunk of rows -> its kept examples as flat arrays, with truncation, drop and format counts."""
    ids: list[int] = []
    labels: list[int] = []
    lengths: list[int] = []
    chunk = EncodedChunk(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int64), rows=len(pairs))
    facts: list[tuple] = []
    for (fmt, _), (enc, why) in zip(pairs, encode_batch(pairs, tokenizer, template, settings, facts)):
        chunk.formats[fmt] += 1
        if enc is None:
            chunk.dropped[why] += 1
            continue
        chunk.truncated += bool(enc.truncated)
        ids += enc.input_ids
        labels += enc.labels
        lengths.append(len(enc.input_ids))
    chunk.input_ids = np.asarray(ids, dtype=np.int32)
    chunk.labels = np.asarray(labels, dtype=np.int32)
    chunk.lengths = np.asarray(lengths, dtype=np.int64)
    chunk.facts = np.asarray(facts, dtype=np.int32).reshape(len(pairs), -1)
    return chunk


# ---- worker processes -----------------------------------------------------------------------------------------
_WORKER: tuple = ()


def _init_worker(tokenizer, template: Template, settings) -> None:
    global _WORKER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process: the processes are the parallelism
    _WORKER = (tokenizer, template, settings)


def _work(pairs: list[tuple[str, Row]]) -> EncodedChunk:
    return encode_chunk(pairs, *_WORKER)


def _chunks(pairs: Iterable[tuple[str, Row]], size: int) -> Iterator[list[tuple[str, Row]]]:
    chunk: list = []
    for p in pairs:
        chunk.append(p)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def encode_stream(pairs: Iterable[tuple[str, Row]], tokenizer, template: Template, settings,
                  num_workers: int | None = None, total: int | None = None, desc: str = "tokenize",
                  chunk_rows: int = CHUNK_ROWS) -> Iterator[EncodedChunk]:
    """Encoded chunks of the rows, in order, over num_workers processes (in this process when 0 or 1).

    At most two chunks per worker are in flight, so rows are read only as fast as they are tokenized. A DataError
    in a worker (a bad row) is raised here with its file, line and field."""
    bar = _Progress(total, desc)
    num_workers = usable_workers(num_workers)
    try:
        if num_workers <= 1:
            for chunk in _chunks(pairs, chunk_rows):
                done = encode_chunk(chunk, tokenizer, template, settings)
                bar.update(done.rows)
                yield done
            return
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(num_workers, _init_worker, (tokenizer, template, settings)) as pool:
            pending: deque = deque()
            for chunk in _chunks(pairs, chunk_rows):
                pending.append(pool.apply_async(_work, (chunk,)))
                while len(pending) >= 2 * num_workers:
                    done = pending.popleft().get()
                    bar.update(done.rows)
                    yield done
            while pending:
                done = pending.popleft().get()
                bar.update(done.rows)
                yield done
    finally:
        bar.close()


def usable_workers(requested: int | None) -> int:
    """``preprocessing_num_workers``, but at most one process per CPU this process may run on: more only take turns
    on the same cores, each starting up and loading the tokenizer (LLaMA-Factory's example asks for 16)."""
    if not requested or requested <= 1:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(requested, cpus)


class _Progress:
    """A tqdm bar (rows/s, ETA) shown once the work has taken more than a few seconds, on the main rank only."""

    def __init__(self, total: int | None, desc: str):
        self.total, self.desc = total, desc
        self.started = time.monotonic()
        self.done = 0
        self.bar = None
        self.quiet = int(os.environ.get("RANK", "0")) != 0

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is None and not self.quiet and time.monotonic() - self.started > PROGRESS_AFTER_S:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, desc=f"[sftlab] {self.desc}", unit=" rows",
                            file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
        elif self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def count_trained(labels: np.ndarray) -> int:
    return int(np.count_nonzero(labels != IGNORE_INDEX))
