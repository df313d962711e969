"""`sftlab index`: build (or refresh) the FAISS index of a document collection ahead of training."""

from __future__ import annotations

import sys
from types import SimpleNamespace

from sftlab.config import Option, command_help, parse_command
from sftlab.errors import SftlabError

INDEX_OPTIONS = (
    Option("documents", help="Document collection: records JSONL, raw JSONL or LocalRQA .pkl", required=True),
    Option("embedding_model", None, "sentence-transformers directory or cached hub id (default: bundled "
           "all-MiniLM-L6-v2)"),
    Option("out", help="Index directory (created; an outdated sftlab index is replaced)", required=True),
    Option("chunk_size", 256, "Raw documents: tokens per chunk", type=int),
    Option("chunk_overlap", 32, "Raw documents: tokens shared by consecutive chunks", type=int),
    Option("tokenizer", None, "Tokenizer directory for chunking raw documents (default: words)"),
    Option("refuse_stale", False, "Fail instead of replacing an index built for other data", type=bool),
)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(command_help("sftlab index --documents FILE --out DIR [--key value ...]", INDEX_OPTIONS))
        return 0
    try:
        args = SimpleNamespace(**parse_command(argv, INDEX_OPTIONS, "sftlab index", takes_config=False).options)
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
