"""`sftlab data preview`: the same config as training, trained spans marked, JSON with ids and trained text."""

from __future__ import annotations

import json

from sftlab.cli import main


def test_preview_text_and_json(tmp_path, tiny_model_dir, capsys):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                               {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]},
            {"instruction": "ignored in this file", "output": "x"}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rows[0]) + "\n")
    assert main(["data", "preview", "--model_name_or_path", tiny_model_dir, "--train_file", str(f),
                 "--template", "chatml", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[Hello!<|im_end|>]]" in out and "[[See you.<|im_end|>]]" in out
    assert "<|im_start|>user\nHi<|im_end|>" in out and "[[Hi" not in out
    assert "2 prompt" not in out and "trained" in out

    assert main(["data", "preview", "--model_name_or_path", tiny_model_dir, "--train_file", str(f),
                 "--template", "chatml", "--train_on", "last_turn", "--format", "json"]) == 0
    rec = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert set(rec) >= {"input_ids", "labels", "text", "trained_text"}
    assert rec["trained_text"] == "See you.<|im_end|>"
    assert len(rec["input_ids"]) == len(rec["labels"])
    assert rec["text"].startswith("<|im_start|>user\nHi")
    trained = [i for i, l in zip(rec["input_ids"], rec["labels"]) if l != -100]
    assert trained == [l for l in rec["labels"] if l != -100]


def test_preview_reports_bad_rows_with_file_and_line(tmp_path, tiny_model_dir, capsys):
    f = tmp_path / "d.jsonl"
    f.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    assert main(["data", "preview", "--model_name_or_path", tiny_model_dir, "--train_file", str(f), "--n", "5"]) == 2
    err = capsys.readouterr().err
    assert "d.jsonl, line 2, field 'output': missing" in err
