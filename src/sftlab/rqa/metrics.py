"""Retrieval and answer-similarity metrics for retrieval-QA evaluation."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from sftlab.rqa.documents import as_document
from sftlab.rqa.schema import Document

_WS = re.compile(r"\s+")


def _norm(text: str) -> str:
    return _WS.sub(" ", text).strip()


def same_document(a: Document | dict, b: Document | dict) -> bool:
    """Same passage: equal page content up to whitespace, and equal source when both sides name one.

    Gold passages in rqa rows sometimes lack metadata, so a missing source does not count as a mismatch.
    """
    a, b = as_document(a), as_document(b)
    if a.source is not None and b.source is not None and a.source != b.source:
        return False
    return _norm(a.page_content) == _norm(b.page_content)


def retrieval_recall(
    retrieved: Sequence[Sequence[Document | dict]], gold: Sequence[Sequence[Document | dict]], k: int
) -> float:
    """recall@k: the fraction of questions with at least one gold passage among their top-k retrieved ones.

    Questions without any gold passage are left out of the denominator (nothing could be recalled);
    0.0 when no question has gold passages.
    """
    if len(retrieved) != len(gold):
        raise ValueError(f"retrieved has {len(retrieved)} questions but gold has {len(gold)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    hits = counted = 0
    for got, want in zip(retrieved, gold):
        if not want:
            continue
        counted += 1
        if any(same_document(r, g) for r in list(got)[:k] for g in want):
            hits += 1
    return hits / counted if counted else 0.0


def embedding_similarity(embedder, preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean cosine similarity between each prediction and its reference answer (0.0 for no pairs)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions but {len(refs)} references")
    if not preds:
        return 0.0
    # Both sides are answers, so both take the query-side prefix (symmetric use of e5-style models).
    p = embedder.embed_queries(list(preds))
    r = embedder.embed_queries(list(refs))
    return float(np.mean(np.sum(p * r, axis=1)))
