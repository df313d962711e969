"""Exact and near duplicates (MinHash LSH) against exact Jaccard similarities computed here, and the cleaned copies."""

from __future__ import annotations

import json
import random

import pytest

from sftlab.data.duplicates import DuplicateIndex, Place, normalise, shingles, write_deduplicated
from sftlab.errors import ConfigError


def _jaccard(a: str, b: str) -> float:
    x, y = shingles(normalise(a)), shingles(normalise(b))
    return len(x & y) / len(x | y)


def test_normalise_and_shingles():
    assert normalise("  Hello\tWORLD \n again ") == "hello world again"
    assert shingles("a b c d") == {b"a b c", b"b c d"}
    assert shingles("two words") == {b"two words"}


def test_near_duplicates_are_the_pairs_above_the_threshold():
    """Rows made by changing k of 60 words of a base row: the index flags exactly those whose true Jaccard similarity
    is clearly above the threshold and none of those clearly below (the MinHash estimate is within a few hundredths)."""
    rng = random.Random(3)
    vocab = [f"v{i}" for i in range(5000)]
    index = DuplicateIndex(threshold=0.8)
    bases = [" ".join(rng.choice(vocab) for _ in range(60)) for _ in range(40)]
    for i, b in enumerate(bases):
        assert index.add_train(b, Place("train", "t", i + 1)) is None
    flagged, clear_above, clear_below = set(), set(), set()
    for j in range(60):
        base = bases[j % 40]
        words = base.split()
        for pos in rng.sample(range(60), j % 12):
            words[pos] = f"new{j}_{pos}"
        text = " ".join(words)
        sim = _jaccard(text, base)
        if sim >= 0.88:
            clear_above.add(j)
        elif sim <= 0.72:
            clear_below.add(j)
        m = index.check(text, Place("eval", "e", j + 1))
        if m is not None:
            assert m.original.line == j % 40 + 1 and (m.kind == "exact") == (text == base)
            flagged.add(j)
    assert clear_above and clear_below
    assert clear_above <= flagged and not (clear_below & flagged)


def test_first_occurrence_is_the_original():
    index = DuplicateIndex()
    assert index.add_train("The same text", Place("train", "t", 1)) is None
    m = index.add_train("the  SAME\ntext", Place("train", "t", 2))
    assert (m.kind, m.original.line, m.place.line) == ("exact", 1, 2)
    assert index.check("unrelated words entirely", Place("eval", "e", 1)) is None


def test_write_deduplicated_jsonl_and_json(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(5)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path, kept = write_deduplicated(str(src), {2, 5}, tmp_path / "out")
    assert [json.loads(l) for l in path.read_text().splitlines()] == [rows[0], rows[2], rows[3]] and kept == 3
    assert path.name == "d.dedup.jsonl" and len(src.read_text().splitlines()) == 5

    arr = tmp_path / "a.json"
    arr.write_text(json.dumps(rows))
    path, kept = write_deduplicated(str(arr), {1}, tmp_path / "out")
    assert json.loads(path.read_text()) == rows[1:] and kept == 4

    with pytest.raises(ConfigError, match="only .jsonl and .json"):
        write_deduplicated(str(tmp_path / "x.csv"), set(), tmp_path / "out")


def test_numpy_shingle_hashes_are_the_shingle_sets():
    """The hashes computed in numpy for a batch of texts stand for exactly their `shingles` sets: as many distinct
    hashes as shingles, and two texts share as many hashes as shingles (texts with repeated words, short texts,
    an empty one and non-ASCII words included)."""
    from sftlab.data.duplicates import shingle_hashes

    rng = random.Random(5)
    vocab = ["a", "b", "c", "dé", "東京", "xyz", "ab", "ba"]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 40))) for _ in range(60)] + ["", "a", "a b"]
    norms = [normalise(t) for t in texts]
    hashes, first = shingle_hashes(norms)
    bounds = list(first) + [len(hashes)]
    sets = [set(hashes[bounds[i]:bounds[i + 1]].tolist()) for i in range(len(norms))]
    for i in range(len(norms)):
        assert len(sets[i]) == len(shingles(norms[i]))
        for j in range(i):
            assert len(sets[i] & sets[j]) == len(shingles(norms[i]) & shingles(norms[j])), (norms[i], norms[j])
