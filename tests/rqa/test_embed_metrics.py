"""Embedder (offline loading, normalisation, e5 prefixes) and the retrieval/answer metrics."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest

from sftlab.errors import ConfigError
from sftlab.rqa.documents import Document
from sftlab.rqa.embed import BUNDLED_MODEL_ID, Embedder, bundled_minilm_dir
from sftlab.rqa.metrics import embedding_similarity, retrieval_recall, same_document


def test_default_is_bundled_minilm_normalised(minilm):
    assert minilm.model_id.startswith(BUNDLED_MODEL_ID + "#")
    v = minilm.embed_queries(["Where is Corvish Lighthouse?", "a"])
    assert v.dtype == np.float32 and v.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert minilm.embed_passages([]).shape == (0, 384)
    # Same vectors as encoding with sentence-transformers directly and normalising by hand.
    raw = minilm.model.encode(["Where is Corvish Lighthouse?"], convert_to_numpy=True)
    np.testing.assert_allclose(v[0], raw[0] / np.linalg.norm(raw[0]), atol=1e-5)


def test_hub_id_not_available_offline_is_a_config_error():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="intfloat/e5-nonexistent-sftlab-test"):
        Embedder("intfloat/e5-nonexistent-sftlab-test")
    assert time.monotonic() - t0 < 30  # fails fast offline instead of waiting on the network


def test_e5_models_get_prefixes(tmp_path, tiny_st_dir):
    e5_dir = tmp_path / "my-e5-small"
    shutil.copytree(tiny_st_dir, e5_dir)
    e5, plain = Embedder(str(e5_dir)), Embedder(tiny_st_dir)
    assert (e5.query_prefix, e5.passage_prefix) == ("query: ", "passage: ")
    assert (plain.query_prefix, plain.passage_prefix) == ("", "")
    text = "Kelpbrick was invented in 1931."
    direct = plain.embed_queries(["query: " + text, "passage: " + text])  # same weights, prefixes by hand
    np.testing.assert_allclose(e5.embed_queries([text])[0], direct[0], atol=1e-5)
    np.testing.assert_allclose(e5.embed_passages([text])[0], direct[1], atol=1e-5)
    assert not np.allclose(direct[0], direct[1], atol=1e-4)


def test_model_changed_in_place_changes_model_id(tmp_path, tiny_st_dir):
    d = tmp_path / "model"
    shutil.copytree(tiny_st_dir, d)
    before = Embedder(str(d)).model_id
    assert Embedder(str(d)).model_id == before
    cfg = d / "config_sentence_transformers.json"
    cfg.write_text(cfg.read_text() + " ")
    assert Embedder(str(d)).model_id != before
    assert Embedder(str(d)).model_id.startswith(str(d.resolve()))


def doc(src, text):
    return Document(text, metadata={"source": src, "title": "t"})


def test_same_document():
    assert same_document(doc("a", "Hello  world\n"), doc("a", " Hello world"))
    assert not same_document(doc("a", "Hello world"), doc("b", "Hello world"))
    assert not same_document(doc("a", "Hello world"), doc("a", "Hello world!"))
    # rqa-row dicts work too; a missing source on one side does not count as a mismatch.
    assert same_document({"page_content": "Hello world", "metadata": {}}, doc("a", "Hello world"))


def test_retrieval_recall_hand_computed():
    g1, g2, g3, x, y = doc("g1", "one"), doc("g2", "two"), doc("g3", "three"), doc("x", "ex"), doc("y", "why")
    retrieved = [
        [g1, x, y],  # gold at rank 1
        [x, g2, y],  # gold at rank 2
        [x, y, g3],  # gold at rank 3
        [x, y, x],  # never
    ]
    gold = [[g1], [g2, doc("g2b", "two-b")], [g3], [doc("z", "zed")]]
    assert retrieval_recall(retrieved, gold, 1) == pytest.approx(1 / 4)
    assert retrieval_recall(retrieved, gold, 2) == pytest.approx(2 / 4)
    assert retrieval_recall(retrieved, gold, 3) == pytest.approx(3 / 4)
    # A question without gold passages is left out of the denominator.
    assert retrieval_recall(retrieved + [[g1]], gold + [[]], 1) == pytest.approx(1 / 4)
    assert retrieval_recall([], [], 1) == 0.0
    with pytest.raises(ValueError):
        retrieval_recall(retrieved, gold[:2], 1)


class FixedEmbedder:
    """Maps known strings to fixed unit vectors, so the expected mean cosine is computable by hand."""

    table = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [0.6, 0.8]}

    def embed_queries(self, texts):
        return np.array([self.table[t] for t in texts], dtype=np.float32)


def test_embedding_similarity_hand_computed():
    e = FixedEmbedder()
    # cos(a,a)=1, cos(a,b)=0, cos(a,c)=0.6, cos(b,c)=0.8 -> mean 2.4/4
    assert embedding_similarity(e, ["a", "a", "a", "b"], ["a", "b", "c", "c"]) == pytest.approx(0.6)
    assert embedding_similarity(e, [], []) == 0.0


def test_embedding_similarity_real_model(minilm):
    same = embedding_similarity(minilm, ["The drift was introduced in 1822."], ["The drift was introduced in 1822."])
    assert same == pytest.approx(1.0, abs=1e-5)
    close = embedding_similarity(minilm, ["The drift came into use in 1822."], ["The drift was introduced in 1822."])
    far = embedding_similarity(minilm, ["Puffins nest in cliff burrows."], ["The drift was introduced in 1822."])
    assert close > far


def test_bundled_dir_exists():
    assert (bundled_minilm_dir().rstrip("/").endswith("model"))
