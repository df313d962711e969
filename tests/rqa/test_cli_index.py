"""`sftlab index` entry point (sftlab.rqa.cli_index.main)."""

from __future__ import annotations

import json

from sftlab.rqa.cli_index import main
from sftlab.rqa.documents import documents_hash, load_documents


def test_index_cli_builds_then_reuses(tmp_path, capsys):
    docs_path = tmp_path / "raw.jsonl"
    rows = [
        {"text": " ".join(f"alpha{i}" for i in range(30)), "source": "s1", "title": "Alpha"},
        {"text": "Short beta passage about puffins.", "source": "s2", "title": "Beta"},
    ]
    docs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "index"
    argv = ["--documents", str(docs_path), "--out", str(out), "--chunk_size", "12", "--chunk_overlap", "2"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    # 30 words in windows of 12 with stride 10 -> 3 chunks, plus the short document.
    assert "Loaded 4 documents" in text and "Wrote index of 4 vectors" in text and str(out) in text
    manifest = json.loads((out / "manifest.json").read_text())
    expected_docs = load_documents(docs_path, None, 12, 2)
    assert manifest["count"] == 4 and manifest["documents_hash"] == documents_hash(expected_docs)

    assert main(argv) == 0
    assert "Up to date" in capsys.readouterr().out


def test_index_cli_reports_errors(tmp_path, capsys):
    assert main(["--documents", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "i")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "missing.jsonl" in err
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"page_content": "x", "metadata": {}}) + "\n")
    assert main(["--documents", str(docs), "--out", str(tmp_path / "i"), "--embedding_model", "no-such/model-xyz"]) == 2
    assert "no-such/model-xyz" in capsys.readouterr().err
