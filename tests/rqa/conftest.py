"""Embedding-model fixtures for the retrieval tests: the bundled all-MiniLM-L6-v2 (loaded once per session)
and a second, tiny, randomly initialised sentence-transformers model built here, so "the embedding model
changed" can be tested with two real models and no download."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def minilm():
    from sftlab.rqa.embed import Embedder

    return Embedder(None)


def build_tiny_st_model(out_dir, hidden: int = 32, seed: int = 0) -> str:
    """A 2-layer BertModel (MiniLM's vocabulary) + mean pooling, saved as a sentence-transformers directory."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    from sftlab.rqa.embed import bundled_minilm_dir

    tok = AutoTokenizer.from_pretrained(bundled_minilm_dir())
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )
    hf_dir = out_dir / "hf"
    BertModel(cfg).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    st = SentenceTransformer(modules=[Transformer(str(hf_dir), max_seq_length=128), Pooling(hidden, "mean")])
    st_dir = out_dir / "st"
    st.save(str(st_dir))
    return str(st_dir)


@pytest.fixture(scope="session")
def tiny_st_dir(tmp_path_factory):
    return build_tiny_st_model(tmp_path_factory.mktemp("tiny-st"))
