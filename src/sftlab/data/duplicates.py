"""Duplicate rows inside the training set, and training rows that reappear in the eval / test sets (contamination).

A row's text is the content of its messages (or its `text`), lower-cased with whitespace collapsed. Exact duplicates
share that text (compared by a 128-bit digest). Near duplicates have an estimated Jaccard similarity of their word
3-shingle sets of at least `threshold`: MinHash signatures indexed by `datasketch`'s LSH find the candidates, and the
signatures' agreement is the estimate. Only each row's digest and a 32-bit copy of its signature are kept, so a
200k-row set costs tens of megabytes.

The first occurrence of a text is the original; later copies are the duplicates (and what `--dedup` removes).
`write_deduplicated` writes the training files without them, under a new name, atomically: the user's files are
never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftlab.errors import ConfigError

SHINGLE_WORDS = 3
EXAMPLES_KEPT = 5  # first examples listed per kind


def normalise(text: str) -> str:
    """Lower case, every run of whitespace one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def shingles(norm: str, k: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of k-word shingles of normalised text (the whole text when it has fewer than k words)."""
    words = norm.split(" ")
    if len(words) <= k:
        return {norm.encode()}
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


@dataclass
class Place:
    split: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class Match:
    """`place` repeats `original` (a training row): exactly, or with estimated Jaccard `similarity`."""

    kind: str  # "exact" | "near"
    place: Place
    original: Place
    similarity: float = 1.0

    def to_dict(self) -> dict:
        return {"kind": self.kind, "row": str(self.place), "original": str(self.original),
                "similarity": round(self.similarity, 3)}


@dataclass
class DuplicateCounts:
    exact: int = 0
    near: int = 0
    examples: list[Match] = field(default_factory=list)

    def add(self, m: Match) -> None:
        setattr(self, m.kind, getattr(self, m.kind) + 1)
        if len(self.examples) < EXAMPLES_KEPT:
            self.examples.append(m)

    def to_dict(self) -> dict:
        return {"exact": self.exact, "near": self.near, "examples": [m.to_dict() for m in self.examples]}


class DuplicateIndex:
    """Training rows, added in order; `add_train` says whether a row repeats an earlier one, `check` whether an
    eval/test row repeats a training row."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, seed: int = 1):
        from datasketch import MinHash, MinHashLSH

        if not 0 < threshold <= 1:
            raise ConfigError(f"near-duplicate threshold: {threshold} must be in (0, 1]")
        self.threshold = threshold
        self._first = MinHash(num_perm=num_perm, seed=seed)  # its permutations are shared by every signature
        self._num_perm, self._seed = num_perm, seed
        # Candidates are checked against the signatures, so missed pairs cost more than extra candidates.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8))
        self._exact: dict[bytes, int] = {}
        self._places: list[Place] = []
        self._signatures: list[np.ndarray] = []  # uint32, one per unique training row (index = LSH key)
        self._place_of_key: list[int] = []

    def _minhash(self, norm: str):
        from datasketch import MinHash

        m = MinHash(num_perm=self._num_perm, seed=self._seed, permutations=self._first.permutations,
                    scheme=self._first.scheme)
        m.update_batch(list(shingles(norm)))
        return m

    def _best_near(self, m) -> tuple[int, float] | None:
        sig = m.hashvalues.astype(np.uint32)
        best = None
        for key in self._lsh.query(m):
            sim = float(np.mean(self._signatures[key] == sig))
            if sim >= self.threshold and (best is None or sim > best[1] or (sim == best[1] and key < best[0])):
                best = (key, sim)
        return best

    def add_train(self, text: str, place: Place) -> Match | None:
        norm = normalise(text)
        digest = hashlib.blake2b(norm.encode(), digest_size=16).digest()
        self._places.append(place)
        first = self._exact.get(digest)
        if first is not None:
            return Match("exact", place, self._places[first])
        self._exact[digest] = len(self._places) - 1
        m = self._minhash(norm)
        near = self._best_near(m) if self._signatures else None
        if near is not None:
            return Match("near", place, self._places[self._place_of_key[near[0]]], near[1])
        key = len(self._signatures)
        self._signatures.append(m.hashvalues.astype(np.uint32))
        self._place_of_key.append(len(self._places) - 1)
        self._lsh.insert(key, m, check_duplication=False)
        return None

    def check(self, text: str, place: Place) -> Match | None:
        norm = normalise(text)
        first = self._exact.get(hashlib.blake2b(norm.encode(), digest_size=16).digest())
        if first is not None:
            return Match("exact", place, self._places[first])
        if not self._signatures:
            return None
        near = self._best_near(self._minhash(norm))
        if near is not None:
            return Match("near", place, self._places[self._place_of_key[near[0]]], near[1])
        return None


# ---- cleaned copies ------------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def deduplicated_name(path: str) -> str:
    p = Path(path)
    return f"{p.stem}.dedup{p.suffix}"


def write_deduplicated(path: str, remove: set[int], out_dir: Path) -> tuple[Path, int]:
    """A copy of one JSON/JSONL training file without the rows numbered in `remove` (1-based lines for JSONL,
    rows for a JSON array), as `out_dir/<name>.dedup<suffix>`. Returns (path, rows written)."""
    src = Path(path)
    target = out_dir / deduplicated_name(path)  # never the input's name: '.dedup' is added
    suffix = src.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"--dedup: writing a cleaned copy of '{suffix}' files is not supported (only .jsonl and "
                          f".json); cannot clean {src}")
    text = src.read_bytes().decode("utf-8-sig")
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
        kept = [r for i, r in enumerate(rows, start=1) if i not in remove]
        _atomic_write(target, lambda fh: fh.write(json.dumps(kept, ensure_ascii=False, indent=1) + "\n"))
        return target, len(kept)
    lines = text.splitlines(keepends=True)
    kept_lines = [l for n, l in enumerate(lines, start=1) if n not in remove]
    _atomic_write(target, lambda fh: fh.writelines(kept_lines))
    return target, sum(1 for l in kept_lines if l.strip())
