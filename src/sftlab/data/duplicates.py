"""Duplicate rows inside the training set, and training rows that reappear in the eval / test sets (contamination).

A row's text is the content of its messages (or its `text`), lower-cased with whitespace collapsed. Exact duplicates
share that text (compared by a 128-bit digest). Near duplicates have an estimated Jaccard similarity of their word
3-shingle sets of at least `threshold`: MinHash signatures indexed by `datasketch`'s LSH find the candidates, and the
signatures' agreement is the estimate.

`fingerprints` computes digests and signatures for a batch of texts in numpy (each word hashed by a polynomial over
its bytes, each shingle by mixing its three word hashes to 32 bits, then datasketch's permutations and a
segment-wise minimum): no Python step per shingle, and it runs in worker processes (`report` feeds it chunks of
rows). The index itself (`DuplicateIndex`) is filled in row order, since the first occurrence of a text is the
original. Only each row's digest, a 32-bit copy of its signature (in blocks) and the LSH buckets (keyed by 8-byte
hashes of the bands) are kept.

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

from sftlab.data import formats as F
from sftlab.data.loader import Row
from sftlab.errors import ConfigError

SHINGLE_WORDS = 3
EXAMPLES_KEPT = 5  # first examples listed per kind
NUM_PERM = 128
SEED = 1
SCHEME = "affine32"  # datasketch's 32-bit permutation scheme
_BLOCK = 4096  # signatures per stored block
_SUB_BATCH = 32  # texts per (permutations x shingles) matrix in `fingerprints`
_MASK64 = (1 << 64) - 1
_P = 0x100000001B3  # polynomial base for word hashes (odd: invertible modulo 2**64)
_P_INV = pow(_P, -1, 1 << 64)
_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9], dtype=np.uint64)


def normalise(text: str) -> str:
    """Lower case, every run of whitespace one space, no leading/trailing space."""
    return " ".join(text.lower().split())


def shingles(norm: str, k: int = SHINGLE_WORDS) -> set[bytes]:
    """The set of k-word shingles of normalised text (the whole text when it has fewer than k words)."""
    words = norm.split(" ")
    if len(words) <= k:
        return {norm.encode()}
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


def _fmix32(h: np.ndarray) -> np.ndarray:
    """64-bit finaliser (murmur3's fmix64), top 32 bits: the shingle hashes datasketch's permutations take."""
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> np.uint64(33))
    h = h * np.uint64(0xC4CEB9FE1A85EC53)
    h = h ^ (h >> np.uint64(33))
    return h >> np.uint64(32)


def shingle_hashes(norms: list[str], k: int = SHINGLE_WORDS) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes (as uint64) of every k-word shingle of each normalised text (one hash of the whole text when it
    has fewer than k words, as `shingles`), and the index of the first hash of each text. A text's shingle set maps
    to its set of hashes; repeated shingles repeat a hash, which a minimum does not mind."""
    data = np.frombuffer("\n".join(norms).encode(), dtype=np.uint8)
    n = len(data)
    boundary = np.flatnonzero((data == 0x20) | (data == 0x0A))
    starts = np.concatenate([[0], boundary + 1]).astype(np.int64)
    ends = np.concatenate([boundary, [n]]).astype(np.int64)
    text_of = np.concatenate([[0], np.cumsum(data[boundary] == 0x0A)]).astype(np.int64)  # text index per word
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(n + 1, _P, dtype=np.uint64))
        powers = np.concatenate([[np.uint64(1)], powers[:-1]])
        inverse = np.cumprod(np.full(n + 1, _P_INV, dtype=np.uint64))
        inverse = np.concatenate([[np.uint64(1)], inverse[:-1]])
        prefix = np.concatenate([[np.uint64(0)], np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[:n])])
        words = (prefix[ends] - prefix[starts]) * inverse[starts]  # the same bytes anywhere -> the same hash
        words = words * np.uint64(0x9E3779B97F4A7C15) + (ends - starts).astype(np.uint64)
        count = np.bincount(text_of, minlength=len(norms))
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        out, owner = [], []
        full = np.flatnonzero(count >= k)
        if len(full):
            i = np.arange(len(words) - k + 1)
            ok = (text_of[i] == text_of[i + k - 1]) & (count[text_of[i]] >= k)
            i = i[ok]
            h = words[i] * _MIX[0]
            for j in range(1, k):
                h = h + words[i + j] * _MIX[j]
            out.append(h)
            owner.append(text_of[i])
        for t in np.flatnonzero(count < k):  # short texts: one hash of all their words
            w = words[first[t]:first[t] + count[t]]
            h = (w * _MIX[:len(w)]).sum(dtype=np.uint64) + np.uint64(0xA0761D6478BD642F)
            out.append(np.asarray([h], dtype=np.uint64))
            owner.append(np.asarray([t]))
        hashes, owner = np.concatenate(out), np.concatenate(owner)
        order = np.argsort(owner, kind="stable")
        hashes = _fmix32(hashes[order])
    return hashes, np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(norms)))[:-1]])


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from datasketch import MinHash

    return MinHash(num_perm=num_perm, seed=seed, scheme=SCHEME).permutations


def fingerprints(texts: list[str], num_perm: int = NUM_PERM, seed: int = SEED) -> tuple[list[bytes], np.ndarray]:
    """Each text's 128-bit digest of its normalised form and its MinHash signature (uint32: datasketch's affine32
    permutations ``a * h + b`` modulo 2**32 of the shingle hashes, minimum per permutation)."""
    norms = [normalise(t) for t in texts]
    digests = [hashlib.blake2b(n.encode(), digest_size=16).digest() for n in norms]
    a, b = _permutations(num_perm, seed)
    sigs = np.empty((len(norms), num_perm), dtype=np.uint32)
    for lo in range(0, len(norms), _SUB_BATCH):
        hashes, first = shingle_hashes(norms[lo:lo + _SUB_BATCH])
        with np.errstate(over="ignore"):
            phv = a[:, None] * hashes.astype(np.uint32)[None, :] + b[:, None]  # (permutations, shingles)
        sigs[lo:lo + len(first)] = np.minimum.reduceat(phv, first, axis=1).T
    return digests, sigs


def row_content(fmt: str, row: Row, options: F.FormatOptions) -> str:
    """The text a row is judged on: every message's content (or the `text` row)."""
    if fmt == "text":
        return F.row_text(row)
    return "\n".join(m.content for m in F.to_messages(fmt, row, options))


def fingerprint_rows(pairs: list[tuple[str, Row]], options: F.FormatOptions) -> tuple[list[bytes], np.ndarray]:
    """`fingerprints` of (format, row) pairs' `row_content` (what a worker process of the report runs)."""
    return fingerprints([row_content(fmt, row, options) for fmt, row in pairs])


def _band_key(band: bytes) -> bytes:
    return hashlib.blake2b(band, digest_size=8).digest()


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
    eval/test row repeats a training row. The `*_fingerprint` forms take what `fingerprints` computed (in a worker)."""

    def __init__(self, threshold: float = 0.8, num_perm: int = NUM_PERM, seed: int = SEED):
        from datasketch import MinHashLSH

        if not 0 < threshold <= 1:
            raise ConfigError(f"near-duplicate threshold: {threshold} must be in (0, 1]")
        self.threshold = threshold
        self._num_perm, self._seed = num_perm, seed
        # Candidates are checked against the signatures, so missed pairs cost more than extra candidates.
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.2, 0.8), hashfunc=_band_key)
        self._exact: dict[bytes, int] = {}
        self._places: list[Place] = []
        self._blocks: list[np.ndarray] = []  # uint32 signatures of unique training rows, _BLOCK per block
        self._unique = 0  # signatures stored (the LSH key of the next one)
        self._place_of_key: list[int] = []

    def _lean(self, sig: np.ndarray):
        from datasketch import LeanMinHash

        return LeanMinHash(seed=self._seed, hashvalues=sig, scheme=SCHEME)

    def _signature(self, key: int) -> np.ndarray:
        return self._blocks[key // _BLOCK][key % _BLOCK]

    def _store(self, sig: np.ndarray) -> int:
        key = self._unique
        if key % _BLOCK == 0:
            self._blocks.append(np.empty((_BLOCK, self._num_perm), dtype=np.uint32))
        self._blocks[-1][key % _BLOCK] = sig
        self._unique += 1
        return key

    def _best_near(self, lean, sig: np.ndarray) -> tuple[int, float] | None:
        best = None
        for key in self._lsh.query(lean):
            sim = float(np.mean(self._signature(key) == sig))
            if sim >= self.threshold and (best is None or sim > best[1] or (sim == best[1] and key < best[0])):
                best = (key, sim)
        return best

    def add_train(self, text: str, place: Place) -> Match | None:
        (digest,), sigs = fingerprints([text], self._num_perm, self._seed)
        return self.add_train_fingerprint(digest, sigs[0], place)

    def check(self, text: str, place: Place) -> Match | None:
        (digest,), sigs = fingerprints([text], self._num_perm, self._seed)
        return self.check_fingerprint(digest, sigs[0], place)

    def add_train_fingerprint(self, digest: bytes, sig: np.ndarray, place: Place) -> Match | None:
        self._places.append(place)
        first = self._exact.get(digest)
        if first is not None:
            return Match("exact", place, self._places[first])
        self._exact[digest] = len(self._places) - 1
        lean = self._lean(sig)
        near = self._best_near(lean, sig) if self._unique else None
        if near is not None:
            return Match("near", place, self._places[self._place_of_key[near[0]]], near[1])
        key = self._store(sig)
        self._place_of_key.append(len(self._places) - 1)
        self._lsh.insert(key, lean, check_duplication=False)
        return None

    def check_fingerprint(self, digest: bytes, sig: np.ndarray, place: Place) -> Match | None:
        first = self._exact.get(digest)
        if first is not None:
            return Match("exact", place, self._places[first])
        if not self._unique:
            return None
        near = self._best_near(self._lean(sig), sig)
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
