"""`sftlab index`: build (or refresh) the FAISS index of a document collection ahead of training."""

from __future__ import annotations

import argparse
import sys

from sftlab.errors import SftlabError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sftlab index", description="Embed a document collection and write a FAISS index directory."
    )
    p.add_argument("--documents", required=True, help="Document collection: records JSONL, raw JSONL or LocalRQA .pkl")
    p.add_argument(
        "--embedding_model",
        default=None,
        help="sentence-transformers directory or cached hub id (default: bundled all-MiniLM-L6-v2)",
    )
    p.add_argument("--out", required=True, help="Index directory (created; an outdated sftlab index is replaced)")
    p.add_argument("--chunk_size", type=int, default=256, help="Raw documents: tokens per chunk")
    p.add_argument("--chunk_overlap", type=int, default=32, help="Raw documents: tokens shared by consecutive chunks")
    p.add_argument("--tokenizer", default=None, help="Tokenizer directory for chunking raw documents (default: words)")
    p.add_argument("--refuse_stale", action="store_true", help="Fail instead of replacing an index built for other data")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        from sftlab.rqa.documents import load_documents
        from sftlab.rqa.embed import Embedder
        from sftlab.rqa.index import load_or_build_index

        tokenizer = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(args.tokenizer, local_files_only=True)
            except Exception as e:
                raise SftlabError(f"--tokenizer {args.tokenizer}: cannot load tokenizer offline ({e})") from None
        docs = load_documents(args.documents, tokenizer, args.chunk_size, args.chunk_overlap)
        print(f"Loaded {len(docs)} documents from {args.documents}")
        embedder = Embedder(args.embedding_model)
        retriever = load_or_build_index(docs, embedder, args.out, refuse_stale=args.refuse_stale)
    except SftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    m = retriever.manifest
    verb = "Wrote" if retriever.built else "Up to date, reused"
    print(f"{verb} index of {m['count']} vectors (dim {m['dimension']}, model {m['embedding_model']}) at {args.out}")
    return 0
