"""Text with trained character spans -> `input_ids` and `labels`: the one place that decides what is trained.

Labels come from the tokenizer's offsets: a token is trained when its characters overlap a trained span, so a token
that merges the prompt's trailing space with the answer's first word (" answer", "▁answer") is trained rather than
silently lost. The generation prompt is tokenized by `encode_prompt`, which stops before any token that would
reach into the answer; for the final assistant turn the training ids are spliced so that they start with exactly
those prompt ids (checked by tests for every template and format), and every token between the prompt and the
answer is trained, because at generation time the model has to produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sftlab.data.messages import Message
from sftlab.data.templates import Rendered, Template, answer_spans
from sftlab.errors import ConfigError, DataError
from sftlab.logs import log

IGNORE_INDEX = -100
# Stands in for an answer when locating where the generation prompt ends; any word-like start behaves the same.
_PROBE = "Hello"


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    # With `with_answer_mask`: per token, True where it overlaps an assistant message's own text; trained tokens
    # without it are template markup (end-of-turn markers, role headers). None when not asked for.
    answer_mask: list[bool] | None = None


def _tokenize(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _prompt_ids_and_end(tokenizer, prompt_text: str) -> tuple[list[int], int]:
    """Ids of the generation prompt and the character where they end (before any token merging into the answer)."""
    return prompt_cut(len(prompt_text), *_tokenize(tokenizer, prompt_text + _PROBE))


def prompt_cut(n: int, ids: list[int], offs: list[tuple[int, int]]) -> tuple[list[int], int]:
    """From the tokens of a prompt of n characters followed by `_PROBE`: the prompt's ids (those ending by
    character n) and the character where they end."""
    keep = 0
    for s, e in offs:
        if e > n:
            break
        keep += 1
    end = offs[keep - 1][1] if keep else 0
    return list(ids[:keep]), end


def encode_prompt(tokenizer, template: Template, messages: list[Message], tools: list[dict] | None = None) -> list[int]:
    """The ids the model is given to write the next assistant turn; a prefix of the training example's ids."""
    return _prompt_ids_and_end(tokenizer, template.render_prompt(messages, tools))[0]


def fit_prompt(tokenizer, template: Template, messages_without: Callable[[int], list[Message] | None],
               cutoff_len: int, tools: list[dict] | None = None) -> tuple[list[int], list[Message]]:
    """The generation prompt's ids fitted to cutoff_len the way training fits its examples: whole units of the
    oldest context are dropped first (`messages_without(n)`: the prompt's messages without its n oldest exchanges
    or history entries, None when it has fewer), then the prompt is cut from the left, as its end holds the
    question. Returns the ids and the messages they were made from. The one rule for `predict`, generative
    evaluation and the RQA end-to-end evaluation."""
    ids: list[int] = []
    used: list[Message] = []
    drop = 0
    while (messages := messages_without(drop)) is not None:
        ids, used = encode_prompt(tokenizer, template, messages, tools), messages
        if len(ids) <= cutoff_len:
            return ids, used
        drop += 1
    return ids[-cutoff_len:], used


def _overlaps(offs: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: its characters overlap one of the (sorted, disjoint) spans, or it is a zero-width token inside
    one (`span_hits` on lists)."""
    if not offs or not spans:
        return [False] * len(offs)
    return span_hits(np.asarray(offs, dtype=np.int64).reshape(-1, 2),
                     np.asarray(spans, dtype=np.int64).reshape(-1, 2)).tolist()


def span_hits(offs: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Per token ((n, 2) character offsets): whether it overlaps one of the spans ((m, 2), sorted, disjoint), or is
    a zero-width token inside one. Vectorised: the span a token can overlap is the first one ending after the
    token's start."""
    if not len(offs) or not len(spans):
        return np.zeros(len(offs), bool)
    j = np.searchsorted(spans[:, 1], offs[:, 0], side="right")
    inside = j < len(spans)
    jj = np.minimum(j, len(spans) - 1)
    lo, hi = spans[jj, 0], spans[jj, 1]
    s, e = offs[:, 0], offs[:, 1]
    return inside & (((s < hi) & (e > lo)) | ((s == e) & (lo <= s) & (s < hi)))


def encode_rendered(tokenizer, rendered: Rendered, train_all: bool = False,
                    final_prompt_text: str | None = None,
                    answer_chars: list[tuple[int, int]] | None = None) -> Encoded:
    """Tokenize rendered text and label the tokens that overlap its spans (all tokens with train_all).

    With `answer_chars` (character spans of the assistant messages' text, `templates.answer_spans`), the result's
    answer_mask marks the tokens that overlap them."""
    ids, offs = _tokenize(tokenizer, rendered.text)
    prompt = None
    if final_prompt_text is not None and rendered.spans:
        prompt = _prompt_ids_and_end(tokenizer, final_prompt_text)
    return label_tokens(ids, offs, rendered, train_all, prompt, answer_chars)


def label_tokens(ids: list[int], offs: list[tuple[int, int]], rendered: Rendered, train_all: bool,
                 prompt: tuple[list[int], int] | None,
                 answer_chars: list[tuple[int, int]] | None = None) -> Encoded:
    """Labels for the tokens of `rendered.text`: a token is trained when it overlaps a span. `prompt` is the final
    generation prompt's (ids, end character), from `prompt_cut`: the ids are spliced to start with exactly those
    ids, and everything from the prompt's end to the last answer is trained."""
    ids, offs = list(ids), list(offs)
    if prompt is not None and rendered.spans:
        p_ids, p_end = prompt
        if ids[: len(p_ids)] != p_ids:
            # The whole-text tokenization differs inside the prompt; splice at a shared token boundary.
            rest = [i for i, (s, _) in enumerate(offs) if s >= p_end]
            if rest and offs[rest[0]][0] == p_end:
                k = rest[0]
                ids = p_ids + ids[k:]
                offs = [(0, 0)] * len(p_ids) + offs[k:]
        spans = _from_prompt_end(rendered, p_end)
    else:
        spans = rendered.spans
    if train_all:
        labels = list(ids)
    else:
        labels = [i if trained else IGNORE_INDEX for i, trained in zip(ids, _overlaps(offs, spans))]
    mask = _overlaps(offs, answer_chars) if answer_chars is not None else None
    return Encoded(ids, labels, answer_mask=mask)


def _from_prompt_end(rendered: Rendered, p_end: int) -> list[tuple[int, int]]:
    """Spans with the final turn's first span reaching back to where the generation prompt's tokens end:
    everything after the generation prompt up to the answer is produced by the model, hence trained."""
    spans = list(rendered.spans)
    turns = rendered.turns or list(range(len(spans)))
    opens = rendered.opens_turn or [True] * len(spans)
    for k, (s, e) in enumerate(spans):
        if turns[k] == turns[-1] and opens[k]:
            spans[k] = (min(p_end, s), e)
            break
    return spans


def trained_turns(messages: list[Message], train_on: str) -> set[int]:
    """Indices of the assistant messages whose text is trained: train_on's choice, overridden per message by its
    own `train` flag (loss_weight / train fields)."""
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    out = set()
    for i, m in enumerate(messages):
        if m.role != "assistant":
            continue
        default = train_on != "last_turn" or i == last
        if (m.train if m.train is not None else default):
            out.add(i)
    return out


@dataclass
class Prepared:
    """A conversation made text, before tokenization: what is trained, and the final generation prompt."""

    rendered: Rendered
    train_all: bool
    prompt_text: str | None  # the final turn's generation prompt, when that turn is trained
    answer_chars: list[tuple[int, int]] | None


def prepare_messages(template: Template, messages: list[Message], train_on: str = "completion",
                     tools: list[dict] | None = None, train_on_reasoning: bool = True,
                     with_answer_mask: bool = False) -> Prepared:
    rendered = template.render(messages, tools, train_on_reasoning)
    answers = answer_spans(rendered, messages) if with_answer_mask else None
    keep = trained_turns(messages, train_on)
    picked = [k for k, t in enumerate(rendered.turns) if t in keep]
    rendered = Rendered(rendered.text, [rendered.spans[k] for k in picked], [rendered.turns[k] for k in picked],
                        [rendered.opens_turn[k] for k in picked])
    final = len(messages) - 1
    prompt_text = template.render_prompt(messages[:-1], tools) if final in keep else None
    return Prepared(rendered, train_on == "all", prompt_text, answers)


def encode_messages(tokenizer, template: Template, messages: list[Message], train_on: str = "completion",
                    tools: list[dict] | None = None, train_on_reasoning: bool = True,
                    with_answer_mask: bool = False) -> Encoded:
    p = prepare_messages(template, messages, train_on, tools, train_on_reasoning, with_answer_mask)
    return encode_rendered(tokenizer, p.rendered, train_all=p.train_all, final_prompt_text=p.prompt_text,
                           answer_chars=p.answer_chars)


def encode_text(tokenizer, text: str) -> Encoded:
    """Language-modelling rows: every token is trained, and EOS is appended so documents end."""
    ids, _ = _tokenize(tokenizer, text)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return Encoded(ids, list(ids))


def last_answer_start(enc: Encoded) -> int:
    """Index of the first token of the final trained run (the last answer)."""
    i = len(enc.labels)
    while i > 0 and enc.labels[i - 1] == IGNORE_INDEX:
        i -= 1
    while i > 0 and enc.labels[i - 1] != IGNORE_INDEX:
        i -= 1
    return i


def cut_to_length(enc: Encoded, cutoff_len: int, answer_start: int) -> Encoded:
    """Shorten to cutoff_len: the prompt is cut from the left, the answer from the right, its start always kept.

    When the answer alone is too long, half of the budget still goes to the end of the prompt, so the model never
    learns an answer without the question that precedes it."""
    prompt, rest = enc.input_ids[:answer_start], enc.input_ids[answer_start:]
    p_labels, r_labels = enc.labels[:answer_start], enc.labels[answer_start:]
    keep_prompt = min(len(prompt), max(cutoff_len - len(rest), cutoff_len // 2))
    keep_rest = cutoff_len - keep_prompt
    start = len(prompt) - keep_prompt
    mask = enc.answer_mask[start:answer_start + keep_rest] if enc.answer_mask is not None else None
    return Encoded(prompt[start:] + rest[:keep_rest], p_labels[start:] + r_labels[:keep_rest], truncated=True,
                   answer_mask=mask)


def stop_token_ids(tokenizer, template: Template | None) -> list[int]:
    """EOS plus every end-of-turn string of the template that is a single token."""
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    for s in (template.stop_strings if template else []):
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) == 1 and toks[0] not in ids:
            ids.append(toks[0])
    if not ids:
        raise ConfigError("the tokenizer has no EOS token and the template no single-token end-of-turn marker")
    return ids


def multi_token_stop_strings(tokenizer, template: Template | None) -> list[str]:
    """End-of-turn strings that are not single tokens: generation watches for them as text."""
    out = []
    for s in (template.stop_strings if template else []):
        if s and len(tokenizer(s, add_special_tokens=False)["input_ids"]) != 1:
            out.append(s)
    return out


def check_template_tokens(tokenizer, template: Template) -> None:
    """A named template whose end-of-turn marker is not a token of this tokenizer was written for another model
    family; using it would teach a marker the model cannot emit as one token. Prefix templates (LocalRQA flags)
    are the user's explicit choice: their markers are trained as text and generation stops on the string."""
    if template.name == "prefix":
        for s in multi_token_stop_strings(tokenizer, template):
            log.info(f"note: end-of-turn marker {s!r} is not a single token of this tokenizer; it is trained "
                     "as text and generation stops when the text appears")
        return
    for s in template.stop_strings:
        if not s:
            continue
        toks = tokenizer(s, add_special_tokens=False)["input_ids"]
        if len(toks) != 1 and s.startswith("<") and s.endswith(">"):
            raise DataError(
                f"template '{template.name}': end-of-turn marker '{s}' is not a single token of this tokenizer "
                f"(it splits into {len(toks)} pieces), so the model would not learn to stop; use a template "
                "that matches the model (e.g. --template tokenizer)"
            )
