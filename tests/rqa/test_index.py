"""FAISS index: build, reuse, rebuild on changed documents or embedding model, refuse_stale, and retrieval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sftlab.errors import ConfigError
from sftlab.rqa.documents import Document, documents_hash
from sftlab.rqa.embed import Embedder
from sftlab.rqa.index import build_index, load_or_build_index, read_manifest
from sftlab.rqa.metrics import retrieval_recall

# Six passages on unrelated topics, so each query below has one obvious answer.
PASSAGES = [
    ("https://w.example/volcano", "Mount Ebbenfell", "Mount Ebbenfell is a dormant volcano; lava last flowed from its crater in 1655."),
    ("https://w.example/chowder", "Kellimar chowder", "Kellimar chowder is a thick soup of smoked eel, potatoes and cream, eaten with oat bread."),
    ("https://w.example/bank", "Corrowin Bank", "Corrowin Bank prints banknotes and sets the interest rate for the islands."),
    ("https://w.example/puffin", "Brannock puffin", "The Brannock puffin is a seabird that nests in burrows on the cliffs and dives for fish."),
    ("https://w.example/radio", "Skerry-7", "The Skerry-7 is a waterproof radio receiver that fishermen use to hear weather forecasts."),
    ("https://w.example/football", "Harbour Cup", "The Harbour Cup is a football tournament; the final match is played in the stadium each spring."),
]
QUERIES = [
    ("Which volcano erupted with lava in 1655?", 0),
    ("What soup is made with smoked eel and cream?", 1),
    ("Who prints the banknotes and sets interest rates?", 2),
    ("Which seabird nests in cliff burrows?", 3),
    ("What radio do fishermen use for weather forecasts?", 4),
    ("Which football tournament has its final in spring?", 5),
]


def make_docs(passages=PASSAGES) -> list[Document]:
    return [Document(text, metadata={"source": src, "title": title}) for src, title, text in passages]


def test_build_writes_files_and_searches(tmp_path, minilm):
    docs = make_docs()
    out = tmp_path / "idx"
    r = build_index(docs, minilm, out)
    assert r.built
    assert sorted(p.name for p in out.iterdir()) == ["documents.jsonl", "index.faiss", "manifest.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build dir removed"
    m = json.loads((out / "manifest.json").read_text())
    assert m["embedding_model"] == minilm.model_id and m["documents_hash"] == documents_hash(docs)
    assert (m["dimension"], m["count"]) == (384, 6)
    stored = [json.loads(line) for line in (out / "documents.jsonl").read_text().splitlines()]
    assert stored == [d.to_dict() for d in docs]

    results = r.search([q for q, _ in QUERIES], k=3)
    assert [len(hits) for hits in results] == [3] * 6
    # Scores are cosine similarities, best first; compare with a direct computation.
    qv = minilm.embed_queries([QUERIES[0][0]])[0]
    pv = minilm.embed_passages([d.page_content for d in docs])
    direct = sorted(((float(pv[i] @ qv), i) for i in range(6)), reverse=True)[:3]
    got = [(s, docs.index(d)) for d, s in results[0]]
    assert [i for _, i in got] == [i for _, i in direct]
    np.testing.assert_allclose([s for s, _ in got], [s for s, _ in direct], rtol=1e-4, atol=1e-5)
    assert r.search([], 3) == []
    assert len(r.search(["x"], k=50)[0]) == 6  # k larger than the collection is clipped


def test_recall_at_1_with_real_minilm(tmp_path, minilm):
    docs = make_docs()
    r = load_or_build_index(docs, minilm, tmp_path / "idx")
    results = r.search([q for q, _ in QUERIES], k=1)
    retrieved = [[d for d, _ in hits] for hits in results]
    assert [docs.index(hits[0]) for hits in retrieved] == [i for _, i in QUERIES]
    gold = [[docs[i]] for _, i in QUERIES]
    assert retrieval_recall(retrieved, gold, k=1) == 1.0


def test_reuse_rebuild_and_refuse_stale(tmp_path, minilm, tiny_st_dir):
    docs = make_docs()
    idx = tmp_path / "idx"
    first = load_or_build_index(docs, minilm, idx)  # missing dir -> build
    assert first.built
    manifest_path = idx / "manifest.json"
    mtime = manifest_path.stat().st_mtime_ns
    built_at = read_manifest(idx)["built_at"]

    again = load_or_build_index(make_docs(), minilm, idx)  # equal documents, same model -> reuse
    assert not again.built
    assert manifest_path.stat().st_mtime_ns == mtime and read_manifest(idx)["built_at"] == built_at
    assert [d for d, _ in again.search([QUERIES[3][0]], 1)[0]] == [docs[3]]

    # Documents changed: refuse_stale says so, otherwise a rebuild serves the new collection.
    changed = make_docs(PASSAGES[:5] + [("https://w.example/tide", "Tide", "Spring tides at Port Kellimar rise 6 metres.")])
    with pytest.raises(ConfigError, match="other documents") as ei:
        load_or_build_index(changed, minilm, idx, refuse_stale=True)
    assert str(idx) in str(ei.value)
    assert manifest_path.stat().st_mtime_ns == mtime, "refusing leaves the old index untouched"
    rebuilt = load_or_build_index(changed, minilm, idx)
    assert rebuilt.built and read_manifest(idx)["documents_hash"] == documents_hash(changed)
    top = rebuilt.search(["How high do the spring tides rise?"], 1)[0][0][0]
    assert top.title == "Tide"

    # Embedding model changed (a different real sentence-transformers model): refuse, then rebuild.
    tiny = Embedder(tiny_st_dir)
    assert tiny.model_id != minilm.model_id and tiny.dimension == 32
    with pytest.raises(ConfigError, match="embedding model"):
        load_or_build_index(changed, tiny, idx, refuse_stale=True)
    by_tiny = load_or_build_index(changed, tiny, idx)
    assert by_tiny.built
    m = read_manifest(idx)
    assert (m["embedding_model"], m["dimension"]) == (tiny.model_id, 32)
    assert by_tiny.index.d == 32
    assert not load_or_build_index(changed, tiny, idx).built


def test_damaged_index_is_rebuilt(tmp_path, minilm):
    docs = make_docs()
    idx = tmp_path / "idx"
    build_index(docs, minilm, idx)
    (idx / "index.faiss").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="damaged"):
        load_or_build_index(docs, minilm, idx, refuse_stale=True)
    r = load_or_build_index(docs, minilm, idx)
    assert r.built and r.index.ntotal == 6


def test_empty_dir_builds_foreign_dir_is_refused(tmp_path, minilm):
    docs = make_docs()[:2]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert load_or_build_index(docs, minilm, empty).built
    foreign = tmp_path / "langchain_index"
    foreign.mkdir()
    (foreign / "index.pkl").write_bytes(b"not ours")
    with pytest.raises(ConfigError, match="index.pkl"):
        load_or_build_index(docs, minilm, foreign)
    assert (foreign / "index.pkl").read_bytes() == b"not ours"
