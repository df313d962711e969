"""Text-overlap metrics for generated answers: SQuAD exact match / token F1, ROUGE-1/2/L and BLEU-4.

Tokenization and unicode
------------------------
rouge-score's default tokenizer lowercases and then keeps only ``[a-z0-9]`` runs, so any non-ASCII text
(accented words, Cyrillic, Chinese, ...) silently scores 0. We pass it our own tokenizer instead:

* text is lowercased;
* every CJK ideograph and every Japanese kana is its own token (these scripts put no spaces between words,
  so one-character tokens are the usual word-segmentation-free choice, as in BERT's basic tokenizer);
* everything else is split into runs of unicode letters/digits (``[^\\W_]+``), so ``café`` and ``naïve`` stay
  whole words and punctuation is dropped, like rouge-score's own tokenizer does for ASCII.

No stemming is applied (the Porter stemmer only makes sense for English).

BLEU uses sacrebleu's standard ``13a`` tokenizer after spacing out CJK/kana characters the same way, so Chinese
and Japanese get character n-grams instead of one "word" per sentence.

Exact match and F1 follow the SQuAD v1.1 script (lowercase, drop punctuation and English articles, collapse
whitespace); for F1 CJK/kana characters additionally count as separate tokens, which leaves ASCII results
identical to the SQuAD script.

Empty strings: EM/F1 and ROUGE score 1.0 when prediction and reference both have no tokens and 0.0 when only
one does. BLEU is a corpus statistic and needs no special case (sacrebleu scores an empty corpus 0).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

__all__ = ["squad_normalize", "exact_match", "token_f1", "rouge_tokenize", "text_metrics"]

# CJK Unified Ideographs (+ extension A, compatibility, extensions B-F) and Japanese hiragana/katakana.
_CJK_CHAR = re.compile(
    "([\u3040-\u309f\u30a0-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])"
)
_WORD = re.compile(r"[^\W_]+")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_ASCII_PUNCT = set(string.punctuation)


def _space_cjk(text: str) -> str:
    """Surround every CJK/kana character with spaces so whitespace splitting yields one token per character."""
    return _CJK_CHAR.sub(r" \1 ", text)


def _is_punct(ch: str) -> bool:
    # string.punctuation covers ASCII symbols such as $ and ^ (unicode category S); unicode 'P*' covers
    # punctuation such as 。 ， « » that the ASCII-only SQuAD script would keep.
    return ch in _ASCII_PUNCT or unicodedata.category(ch).startswith("P")


def squad_normalize(s: str) -> str:
    """SQuAD v1.1 answer normalization: lowercase, remove punctuation, articles (a/an/the) and extra whitespace."""
    s = s.lower()
    s = "".join(ch for ch in s if not _is_punct(ch))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _squad_tokens(s: str) -> list[str]:
    return _space_cjk(squad_normalize(s)).split()


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the SQuAD-normalized strings are equal, else 0.0."""
    return float(squad_normalize(pred) == squad_normalize(ref))


def token_f1(pred: str, ref: str) -> float:
    """SQuAD token-overlap F1 in [0, 1] (bag of normalized tokens; CJK characters count as tokens)."""
    p, r = _squad_tokens(pred), _squad_tokens(ref)
    if not p or not r:
        return float(p == r)
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_tokenize(text: str) -> list[str]:
    """Unicode-aware ROUGE tokenizer (see the module docstring)."""
    return _WORD.findall(_space_cjk(text.lower()))


class _UnicodeTokenizer:
    """Adapter for rouge_score.RougeScorer(tokenizer=...), which calls ``.tokenize(text)``."""

    def tokenize(self, text: str) -> list[str]:
        return rouge_tokenize(text)


def _rouge_f(scorer, pred: str, ref: str) -> dict[str, float]:
    if not rouge_tokenize(pred) and not rouge_tokenize(ref):
        # rouge-score reports 0 here; two empty texts agree perfectly, consistent with EM/F1.
        return {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    scores = scorer.score(ref, pred)  # rouge-score's argument order is (target, prediction)
    return {k: v.fmeasure for k, v in scores.items()}


def text_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus metrics on a 0-100 scale.

    ``rouge-1``/``rouge-2``/``rouge-l``: mean per-row rouge-score F-measure; ``bleu-4``: sacrebleu corpus BLEU;
    ``exact_match``/``f1``: mean SQuAD EM / token F1. An empty list scores 0 everywhere.
    """
    from rouge_score import rouge_scorer
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"text_metrics: {len(predictions)} predictions but {len(references)} references")
    n = len(predictions)
    if n == 0:
        return {k: 0.0 for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "exact_match", "f1")}

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False, tokenizer=_UnicodeTokenizer())
    sums = Counter()
    for pred, ref in zip(predictions, references):
        for key, value in _rouge_f(scorer, pred, ref).items():
            sums[key] += value
        sums["em"] += exact_match(pred, ref)
        sums["f1"] += token_f1(pred, ref)

    bleu = sacrebleu.corpus_bleu(
        [_space_cjk(p) for p in predictions], [[_space_cjk(r) for r in references]], tokenize="13a"
    )
    return {
        "rouge-1": 100.0 * sums["rouge1"] / n,
        "rouge-2": 100.0 * sums["rouge2"] / n,
        "rouge-l": 100.0 * sums["rougeL"] / n,
        "bleu-4": float(bleu.score),
        "exact_match": 100.0 * sums["em"] / n,
        "f1": 100.0 * sums["f1"] / n,
    }


def tool_call_metrics(predicted: list[list[dict] | None], expected: list[list[dict] | None]) -> dict[str, float]:
    """Over the rows whose label makes tool calls (0-100): ``tool_call_exact_match``, the share whose generated
    calls (parsed, `sftlab.data.tools.parse_tool_calls`) equal the label's in order, name and arguments (as JSON
    values); ``tool_call_name_match``, the share with the same function names in order. Empty when no label
    makes a call."""
    rows = [(p, e) for p, e in zip(predicted, expected) if e]
    if not rows:
        return {}
    exact = sum(p == e for p, e in rows)
    names = sum(p is not None and [c["name"] for c in p] == [c["name"] for c in e] for p, e in rows)
    return {"tool_call_exact_match": 100.0 * exact / len(rows), "tool_call_name_match": 100.0 * names / len(rows),
            "tool_call_rows": len(rows)}
