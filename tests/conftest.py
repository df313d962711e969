"""Shared fixtures: real tokenizers (bundled SmolLM2 BPE; a SentencePiece-style one built here) and tiny
randomly initialised Llama models built from a config, so every test runs offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer_dir():
    from sftlab.models.bundled import bundled_tokenizer_dir

    return str(bundled_tokenizer_dir())


@pytest.fixture(scope="session")
def smol_tokenizer(smol_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_tokenizer_dir)


@pytest.fixture(scope="session")
def sp_tokenizer(tmp_path_factory):
    """A Llama-style SentencePiece tokenizer (Metaspace '▁', byte fallback, <s>/</s>), trained in-process."""
    from tests.helpers import build_sp_tokenizer

    return build_sp_tokenizer(tmp_path_factory.mktemp("sp_tok"))


@pytest.fixture()
def tiny_model_dir(tmp_path, smol_tokenizer_dir):
    """A 2-layer, 64-wide Llama with the bundled tokenizer, saved as an ordinary HF directory."""
    from tests.helpers import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path / "tiny-model", smol_tokenizer_dir)
