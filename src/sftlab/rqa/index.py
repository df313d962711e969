"""A FAISS inner-product index over normalised passage embeddings, with a manifest that prevents stale reuse.

Layout of an index directory: `index.faiss` (IndexFlatIP), `documents.jsonl` (row i = vector i) and
`manifest.json` (embedding model id, documents hash, dimension, count, sftlab version). An index is reused
only when its manifest matches the current documents and embedding model; otherwise it is rebuilt (or, with
refuse_stale, a ConfigError says what differs). Builds go to a temporary sibling directory that is renamed
into place, so an interrupted build never leaves a half-written index behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import sftlab
from sftlab.errors import ConfigError, DataError
from sftlab.rqa.documents import documents_hash, load_documents, write_documents_jsonl
from sftlab.rqa.schema import Document
from sftlab.rqa.embed import Embedder

INDEX_FILE = "index.faiss"
DOCS_FILE = "documents.jsonl"
MANIFEST_FILE = "manifest.json"
OUR_FILES = frozenset({INDEX_FILE, DOCS_FILE, MANIFEST_FILE})
MANIFEST_FORMAT = "sftlab-faiss-index"
MANIFEST_VERSION = 1


@dataclass
class Retriever:
    """Dense retriever: embeds a batch of queries once and searches the flat index.

    `built` says whether this index was (re)built when the retriever was created, rather than reused.
    """

    embedder: Embedder
    index: Any  # faiss.Index
    documents: list[Document]
    index_dir: Path
    manifest: dict
    built: bool = False

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[Document, float]]]:
        """Top-k passages per query, best first, with their cosine similarity."""
        if k <= 0:
            raise ConfigError(f"retrieval k must be positive, got {k}")
        if len(queries) == 0:
            return []
        vecs = self.embedder.embed_queries(list(queries))
        scores, ids = self.index.search(vecs, min(k, self.index.ntotal))
        return [
            [(self.documents[j], float(s)) for j, s in zip(row_ids, row_scores) if j >= 0]
            for row_ids, row_scores in zip(ids.tolist(), scores.tolist())
        ]


def _manifest_for(docs: Sequence[Document], embedder: Embedder, dimension: int) -> dict:
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "embedding_model": embedder.model_id,
        "documents_hash": documents_hash(docs),
        "dimension": dimension,
        "count": len(docs),
        "metric": "inner_product_on_l2_normalised",
        "sftlab_version": sftlab.__version__,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def build_index(docs: Sequence[Document], embedder: Embedder, out_dir: str | Path) -> Retriever:
    """Embed `docs`, write the index directory (atomically replacing an old sftlab index there)."""
    import faiss

    out_dir = Path(out_dir)
    if not docs:
        raise DataError("cannot build an index over an empty document collection", file=str(out_dir))
    _check_replaceable(out_dir)
    vecs = embedder.embed_passages([d.page_content for d in docs])
    index = faiss.IndexFlatIP(vecs.shape[1])
    index.add(vecs)
    manifest = _manifest_for(docs, embedder, int(vecs.shape[1]))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        write_documents_jsonl(docs, tmp / DOCS_FILE)
        # The manifest is written last: a directory with a manifest has all its files.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Retriever(embedder, index, list(docs), out_dir, manifest, built=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to overwrite a directory that holds anything but an sftlab index (e.g. a langchain index)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ConfigError(f"index path {out_dir} exists and is not a directory")
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in OUR_FILES)
    if foreign:
        raise ConfigError(
            f"index directory {out_dir} holds files sftlab did not write ({', '.join(foreign[:5])}); "
            "sftlab builds its own FAISS index, so point the index path at an empty or new directory"
        )


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rmdir(old)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def read_manifest(index_dir: str | Path) -> dict | None:
    """The manifest of an sftlab index directory, or None when there is none (or it is unreadable)."""
    path = Path(index_dir) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _differences(manifest: dict, expected: dict) -> list[str]:
    diffs = []
    if manifest.get("format_version") != expected["format_version"]:
        diffs.append(f"index format version {manifest.get('format_version')} (expected {expected['format_version']})")
    if manifest.get("embedding_model") != expected["embedding_model"]:
        diffs.append(
            f"it was built with embedding model {manifest.get('embedding_model')!r}, "
            f"now {expected['embedding_model']!r}"
        )
    if manifest.get("documents_hash") != expected["documents_hash"]:
        diffs.append(
            f"it was built for other documents ({manifest.get('count')} documents, hash "
            f"{str(manifest.get('documents_hash'))[:12]}; now {expected['count']} documents, hash "
            f"{expected['documents_hash'][:12]})"
        )
    return diffs


def load_or_build_index(
    docs: Sequence[Document], embedder: Embedder, index_dir: str | Path, refuse_stale: bool = False
) -> Retriever:
    """Reuse the index in `index_dir` when it was built for exactly these documents and this embedding model;
    otherwise rebuild it, or with `refuse_stale` raise a ConfigError that says what differs.

    A missing or empty directory is simply built. Stale vectors are never served.
    """
    import faiss

    index_dir = Path(index_dir)
    if not docs:
        raise DataError("cannot index an empty document collection", file=str(index_dir))
    manifest = read_manifest(index_dir)
    if manifest is None:
        return build_index(docs, embedder, index_dir)

    expected = {
        "format_version": MANIFEST_VERSION,
        "embedding_model": embedder.model_id,
        "documents_hash": documents_hash(docs),
        "count": len(docs),
    }
    diffs = _differences(manifest, expected)
    if diffs:
        if refuse_stale:
            raise ConfigError(
                f"index at {index_dir} is stale: " + "; ".join(diffs) + ". Remove it, point "
                "--full_dataset_index_path elsewhere, or drop --refuse_stale_index to rebuild it."
            )
        return build_index(docs, embedder, index_dir)

    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except Exception:
        index = None
    if index is None or index.ntotal != len(docs) or index.d != embedder.dimension:
        # The manifest matches but the vectors don't (truncated or hand-edited files): rebuild, it's ours.
        if refuse_stale:
            raise ConfigError(f"index at {index_dir} is damaged: {INDEX_FILE} does not match its manifest")
        return build_index(docs, embedder, index_dir)
    return Retriever(embedder, index, list(docs), index_dir, manifest, built=False)


def open_retriever(
    documents_path: str | Path,
    index_dir: str | Path,
    embedding_model: str | None = None,
    refuse_stale: bool = False,
    tokenizer: Any = None,
    chunk_size: int = 256,
    chunk_overlap: int = 32,
) -> Retriever:
    """Convenience for callers holding RQAArguments: load the collection, then reuse or build its index."""
    docs = load_documents(documents_path, tokenizer=tokenizer, chunk_size=chunk_size, chunk_overlap=chunk_overlap)
    return load_or_build_index(docs, Embedder(embedding_model), index_dir, refuse_stale=refuse_stale)


__all__ = [
    "Retriever",
    "build_index",
    "load_or_build_index",
    "open_retriever",
    "read_manifest",
]
