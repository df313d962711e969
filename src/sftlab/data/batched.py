"""Rows -> tokenized examples in batches, over several processes, with a progress bar.

The per-row reference is `dataset.encode_row`. Here a chunk of rows is rendered (the chat template compiled once
per process, and rendered once per conversation shape: sftlab.data.shapes), the texts are tokenized by the fast
tokenizer's batch call (offsets included) into flat numpy arrays, and the whole chunk is labelled at once: every
row's trained character spans are laid end to end and one `tokenize.span_hits` call labels every token, as
`tokenize.label_tokens` does row by row. Rows that need more than that (text rows, rows longer than cutoff_len,
rows whose generation prompt tokenizes differently inside the text) go through the reference's own functions
(`tokenize.label_tokens`, `fitting.fit_encoded`) one at a time. The examples are the same token for token (tested
in tests/data/test_batched.py).

`encode_stream` feeds chunks of rows to `preprocessing_num_workers` processes with a bounded number in flight,
so memory does not grow with the data; every chunk comes back as flat int32 arrays, in order.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, deque
from itertools import chain
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from sftlab.data import formats as F
from sftlab.data.facts import FACT_COLUMNS, row_facts
from sftlab.data.fitting import fit_encoded, naming_row
from sftlab.data.loader import Row
from sftlab.data.templates import Template
from sftlab.errors import SftlabError
from sftlab.data.tokenize import (IGNORE_INDEX, Encoded, _PROBE, _from_prompt_end, label_tokens, prepare_messages,
                                  prompt_cut, span_hits)

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


@dataclass
class Tokens:
    """The tokens of many texts as flat arrays: ``ids[starts[i]:starts[i + 1]]`` are text i's, ``offs`` their
    (start, end) characters. Made straight from the tokenizer's output, without a Python list per token."""

    ids: np.ndarray  # int64
    offs: np.ndarray  # int64, (tokens, 2)
    starts: np.ndarray  # int64, texts + 1

    def row(self, i: int) -> tuple[list[int], list[tuple[int, int]]]:
        s, e = self.starts[i], self.starts[i + 1]
        return self.ids[s:e].tolist(), [tuple(o) for o in self.offs[s:e].tolist()]


def tokenize_flat(tokenizer, texts: list[str]) -> Tokens:
    """`tokenize_batch` as flat arrays."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not texts:
        pairs = tokenize_batch(tokenizer, texts)
        counts = [len(i) for i, _ in pairs]
        ids = np.fromiter(chain.from_iterable(i for i, _ in pairs), np.int64)
        offs = np.fromiter(chain.from_iterable(chain.from_iterable(o for _, o in pairs)), np.int64)
    else:
        encs = backend.encode_batch(texts, add_special_tokens=False)
        counts = [len(e) for e in encs]
        ids = np.fromiter(chain.from_iterable(e.ids for e in encs), np.int64)
        offs = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encs)), np.int64)
    starts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=starts[1:])
    return Tokens(ids, offs.reshape(-1, 2), starts)


@dataclass
class _Plan:
    """One row on its way: rendered (conversations), and once tokenized the generation prompt's (ids, end)."""

    fmt: str
    row: Row
    prep: object = None  # tokenize.Prepared for conversations, None for text rows
    prompt: int = -1  # index into the chunk's prompts, -1 when the final turn is not trained
    turns: int = 1  # assistant messages (1 for text rows)
    cut: tuple | None = None  # the final prompt's (ids, end character), from prompt_cut


def _render(pairs: list[tuple[str, Row]], template: Template, settings) -> tuple[list[_Plan], list[str], list[str]]:
    """Each row's plan, the texts to tokenize (one per row) and the final generation prompts to locate."""
    texts: list[str] = []
    prompts: list[str] = []
    plans: list[_Plan] = []
    for fmt, row in pairs:
        if fmt == "text":
            texts.append(F.row_text(row))
            plans.append(_Plan(fmt, row))
            continue
        messages = F.to_messages(fmt, row, settings.options)
        with naming_row(row):
            prep = prepare_messages(template, messages, settings.train_on, F.row_tools(row),
                                    settings.train_on_reasoning, with_answer_mask=True)
        p = -1
        if prep.prompt_text is not None and prep.rendered.spans:
            p = len(prompts)
            prompts.append(prep.prompt_text)
        texts.append(prep.rendered.text)
        plans.append(_Plan(fmt, row, prep, p, sum(m.role == "assistant" for m in messages)))
    return plans, texts, prompts


@dataclass
class _Rows:
    """What became of each row of a chunk: ``kept[i]`` is a (start, end) range of the flat token arrays (the row
    as tokenized), an (input_ids, labels, truncated) triple (a row the reference's functions made), or the reason
    it was dropped (a str)."""

    kept: list
    ids: np.ndarray  # int64, every row's tokens as tokenized
    labels: np.ndarray  # int32, aligned with ids (fast rows only)
    facts: np.ndarray  # int32 (rows, len(facts.FACT_COLUMNS))


def _encode_rows(pairs: list[tuple[str, Row]], tokenizer, template: Template, settings) -> _Rows:
    """Every row of a chunk, as `dataset.encode_row` would make it, and its `facts.row_facts`.

    Conversations whose tokens start with their generation prompt's tokens and fit cutoff_len (nearly all) are
    labelled for the whole chunk at once with numpy; the others (text rows, rows to shorten, rows whose prompt
    tokenizes differently inside the text) go through the reference's own functions one at a time."""
    plans, texts, prompts = _render(pairs, template, settings)
    toks = tokenize_flat(tokenizer, texts)
    with_prompt = [i for i, plan in enumerate(plans) if plan.prompt >= 0]
    cuts = prompt_cuts(tokenizer, prompts, [texts[i] for i in with_prompt], toks, with_prompt)
    fast = np.zeros(len(plans), bool)
    for i, plan in enumerate(plans):
        if plan.prompt >= 0:
            plan.cut = cuts[plan.prompt]
        n = int(toks.starts[i + 1] - toks.starts[i])
        fast[i] = plan.fmt != "text" and n <= settings.cutoff_len and (
            plan.cut is None or _starts_with(toks, i, plan.cut[0]))
    labels, markup = _label_flat(toks, texts, plans, fast)
    trained = _per_row(labels != IGNORE_INDEX, toks.starts)
    markup = _per_row(markup, toks.starts)
    lengths = np.diff(toks.starts)
    facts = np.zeros((len(plans), len(FACT_COLUMNS)), np.int64)
    kept: list = []
    eos = tokenizer.eos_token_id
    for i, plan in enumerate(plans):
        if fast[i]:
            if trained[i]:
                kept.append((int(toks.starts[i]), int(toks.starts[i + 1])))
                facts[i] = (lengths[i] - trained[i], trained[i], plan.turns, markup[i], 1, 0)
            else:
                kept.append("no trained token")
                facts[i] = (lengths[i], 0, plan.turns, 0, 0, 0)
            continue
        full, (enc, why) = _encode_slow(plan, toks, i, tokenizer, template, settings)
        facts[i] = row_facts(plan.fmt, full, enc, plan.turns, eos)
        kept.append(why if enc is None else (np.asarray(enc.input_ids, np.int32), np.asarray(enc.labels, np.int32),
                                             bool(enc.truncated)))
    return _Rows(kept, toks.ids, labels, facts.astype(np.int32))


def encode_chunk(pairs: list[tuple[str, Row]], tokenizer, template: Template, settings) -> EncodedChunk:
    """A chunk of rows -> its kept examples as flat arrays, with truncation, drop and format counts, and every
    row's facts."""
    rows = _encode_rows(pairs, tokenizer, template, settings)
    chunk = EncodedChunk(np.empty(0, np.int32), np.empty(0, np.int32), np.empty(0, np.int64), rows=len(pairs),
                         facts=rows.facts)
    chunk.formats.update(fmt for fmt, _ in pairs)
    pieces = []
    for k in rows.kept:
        if isinstance(k, str):
            chunk.dropped[k] += 1
            continue
        if len(k) == 3:
            chunk.truncated += k[2]
        pieces.append(k)
    chunk.input_ids, chunk.labels, chunk.lengths = _assemble(pieces, rows.ids, rows.labels)
    return chunk


def encode_batch(pairs: list[tuple[str, Row]], tokenizer, template: Template,
                 settings) -> list[tuple[Encoded | None, str | None]]:
    """Each (format, row) -> (example, None) or (None, reason dropped): the same results as `encode_row`."""
    rows = _encode_rows(pairs, tokenizer, template, settings)
    out: list[tuple[Encoded | None, str | None]] = []
    for k in rows.kept:
        if isinstance(k, str):
            out.append((None, k))
        elif len(k) == 3:
            out.append((Encoded(k[0].tolist(), k[1].tolist(), truncated=k[2]), None))
        else:
            out.append((Encoded(rows.ids[k[0]:k[1]].tolist(), rows.labels[k[0]:k[1]].tolist()), None))
    return out


def _per_row(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sum of values (per token) over each row's tokens."""
    running = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    return running[starts[1:]] - running[starts[:-1]]


def _starts_with(toks: Tokens, i: int, p_ids: list[int]) -> bool:
    s = int(toks.starts[i])
    return toks.ids[s:s + len(p_ids)].tolist() == p_ids


def _label_flat(toks: Tokens, texts: list[str], plans: list[_Plan], fast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels of every token of the chunk, as `tokenize.label_tokens` gives them, for the rows marked fast (the
    others' are left at IGNORE_INDEX), and per token whether it is trained markup (trained, outside the
    assistant's own text: `facts.markup_tokens`). The rows' characters are laid end to end with a gap of one
    between rows, so one `tokenize.span_hits` over the chunk decides every row's tokens without reaching into
    another row."""
    bases = np.zeros(len(texts) + 1, np.int64)
    np.cumsum([len(t) + 1 for t in texts], out=bases[1:])
    spans: list[tuple[int, int]] = []
    answers: list[tuple[int, int]] = []
    train_all = np.zeros(len(plans), bool)
    for i, plan in enumerate(plans):
        if not fast[i]:
            continue
        rendered, b = plan.prep.rendered, int(bases[i])
        answers += [(s + b, e + b) for s, e in plan.prep.answer_chars]
        if plan.prep.train_all:
            train_all[i] = True
            continue
        row_spans = _from_prompt_end(rendered, plan.cut[1]) if plan.cut is not None else rendered.spans
        spans += [(s + b, e + b) for s, e in row_spans]
    row_of = np.repeat(np.arange(len(plans)), np.diff(toks.starts))
    offs = toks.offs + bases[:-1][row_of, None]
    hit = span_hits(offs, np.asarray(spans, np.int64).reshape(-1, 2))
    hit |= train_all[row_of]
    hit &= fast[row_of]
    markup = hit & ~span_hits(offs, np.asarray(answers, np.int64).reshape(-1, 2))
    return np.where(hit, toks.ids, IGNORE_INDEX).astype(np.int32), markup


def _encode_slow(plan: _Plan, toks: Tokens, i: int, tokenizer, template: Template, settings):
    """One row through the reference's own functions (label_tokens, fit_encoded): (its whole encoding, (example or
    None, reason dropped))."""
    ids, offs = toks.row(i)
    if plan.fmt == "text":
        eos = tokenizer.eos_token_id
        ids = ids + ([eos] if eos is not None else [])
        full = Encoded(ids, list(ids))
    else:
        full = label_tokens(ids, offs, plan.prep.rendered, plan.prep.train_all, plan.cut, plan.prep.answer_chars)
    with naming_row(plan.row):
        return full, fit_encoded(plan.fmt, plan.row, full, tokenizer, template, settings, with_answer_mask=True)


def _assemble(pieces: list[tuple], ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kept examples one after another: token ranges of the flat arrays (runs of adjacent ones taken as one
    slice) and (input_ids, labels, ...) arrays, in order."""
    out_ids: list[np.ndarray] = []
    out_labels: list[np.ndarray] = []
    lengths: list[int] = []
    run: list[int] | None = None  # [start, end] of the current run of adjacent ranges

    def flush():
        if run is not None:
            out_ids.append(ids[run[0]:run[1]].astype(np.int32))
            out_labels.append(labels[run[0]:run[1]])

    for piece in pieces:
        if isinstance(piece[0], int):
            s, e = piece
            lengths.append(e - s)
            if run is not None and run[1] == s:
                run[1] = e
                continue
            flush()
            run = [s, e]
            continue
        flush()
        run = None
        out_ids.append(piece[0])
        out_labels.append(piece[1])
        lengths.append(len(piece[0]))
    flush()
    if not out_ids:
        return np.empty(0, np.int32), np.empty(0, np.int32), np.zeros(0, np.int64)
    return np.concatenate(out_ids), np.concatenate(out_labels), np.asarray(lengths, np.int64)


def _split_specials(tokenizer) -> dict[str, int]:
    """Special tokens the tokenizer splits the text on before anything else (not normalized, no strip options):
    the text on either side of one is tokenized on its own."""
    out = {}
    for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if (getattr(t, "special", False) and not getattr(t, "normalized", True) and not getattr(t, "lstrip", False)
                and not getattr(t, "rstrip", False) and not getattr(t, "single_word", False) and t.content):
            out[t.content] = i
    return out


def prompt_cuts(tokenizer, prompts: list[str], texts: list[str], toks: Tokens, rows: list[int]) -> list[tuple]:
    """For each generation prompt, the (ids, end character) that `tokenize.prompt_cut` gives for the tokens of
    ``prompt + _PROBE`` (what `tokenize._prompt_ids_and_end` tokenizes). Prompts begin the text beside them
    (``texts[k]``, tokenized as row ``rows[k]`` of ``toks``): the tokens up to the prompt's last special token are
    taken from the text's tokens (the tokenizer splits on that token first, so what precedes it is tokenized the
    same), and only ``special + rest of the prompt + _PROBE`` is tokenized. Prompts without such a token are
    tokenized whole."""
    specials = _split_specials(tokenizer)
    tails: list[str] = []
    plan: list[tuple | None] = []  # (k, cut, special id, special length, row) or None: tokenize the prompt whole
    for prompt, text, r in zip(prompts, texts, rows):
        cut, special = max(((prompt.rfind(sp), sp) for sp in specials), default=(-1, ""))
        k = -1
        if cut >= 0 and text.startswith(prompt):
            s, e = int(toks.starts[r]), int(toks.starts[r + 1])
            k = int(np.searchsorted(toks.offs[s:e, 0], cut, side="left"))
            if not (k < e - s and tuple(toks.offs[s + k].tolist()) == (cut, cut + len(special))
                    and int(toks.ids[s + k]) == specials[special]):
                k = -1
        if k < 0:
            plan.append(None)
            continue
        plan.append((k, cut, specials[special], len(special), r))
        tails.append(prompt[cut:] + _PROBE)
    unique = list(dict.fromkeys(tails))  # most prompts end the same way ("<|im_start|>assistant\n"): once each
    tokenized = dict(zip(unique, tokenize_batch(tokenizer, unique)))
    tail_tokens = iter([tokenized[t] for t in tails])
    whole = iter(tokenize_batch(tokenizer, [p + _PROBE for p, how in zip(prompts, plan) if how is None]))
    out = []
    for prompt, how in zip(prompts, plan):
        if how is None:
            out.append(prompt_cut(len(prompt), *next(whole)))
            continue
        k, cut, special_id, n, r = how
        t_ids, t_offs = next(tail_tokens)
        if not (t_ids and t_ids[0] == special_id and tuple(t_offs[0]) == (0, n)):
            # not split first after all: the whole prompt
            out.append(prompt_cut(len(prompt), *tokenize_batch(tokenizer, [prompt + _PROBE])[0]))
            continue
        # The text's tokens before the special token end before it, so prompt_cut keeps them all.
        tail_ids, tail_end = prompt_cut(len(prompt) - cut, t_ids, t_offs)
        s = int(toks.starts[r])
        out.append((toks.ids[s:s + k].tolist() + tail_ids, tail_end + cut))
    return out


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
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # An executor rather than a Pool: a worker that dies (killed for memory) fails the run instead of hanging it.
        with ProcessPoolExecutor(num_workers, mp.get_context("spawn"), _init_worker,
                                 (tokenizer, template, settings)) as pool:
            pending: deque = deque()
            try:
                for chunk in _chunks(pairs, chunk_rows):
                    pending.append(pool.submit(_work, chunk))
                    while len(pending) >= 2 * num_workers:
                        done = pending.popleft().result()
                        bar.update(done.rows)
                        yield done
                while pending:
                    done = pending.popleft().result()
                    bar.update(done.rows)
                    yield done
            except BrokenProcessPool:
                raise SftlabError("a tokenization worker process died (killed for memory?); run again, with fewer "
                                   "preprocessing_num_workers if it was memory") from None
            finally:
                for f in pending:
                    f.cancel()
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
