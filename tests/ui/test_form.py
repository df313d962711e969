"""The new-run form: every option of `sftlab train` is in it, and it is checked by the same parser and
preflight as `sftlab train`, with the error placed at the option it names."""

from __future__ import annotations

import pytest

from sftlab.config import all_fields, parse_config
from sftlab.errors import ConfigError
from sftlab.ui import form


def test_every_option_is_in_the_form_once_with_its_help_and_default():
    fields = [f for g in form.form_schema() for f in g["fields"]]
    names = [f["name"] for f in fields]
    assert sorted(names) == sorted(all_fields()) and len(names) == len(set(names))
    by = {f["name"]: f for f in fields}
    assert by["learning_rate"]["default"] == "0.0002" and by["learning_rate"]["kind"] == "float"
    assert by["packing"]["kind"] == "bool" and by["packing"]["default"] == "false"
    assert by["lr_scheduler_type"]["kind"] == "choice" and "cosine" in by["lr_scheduler_type"]["choices"]
    assert by["train_file"]["kind"] == "list" and "jsonl" in by["train_file"]["help"]
    assert by["max_steps"]["kind"] == "int" and by["finetuning_type"]["help"].startswith("'lora'")
    assert by["finetuning_type"]["kind"] == "choice" and by["finetuning_type"]["choices"] == ["lora", "full", "freeze"]


def test_values_become_train_flags():
    assert form.values_to_argv({"train_file": "a.jsonl", "lora_rank": "8", "system": "", "x": None}) == [
        "--train_file", "a.jsonl", "--lora_rank", "8"]


@pytest.mark.parametrize("values, field", [
    ({"learning_rate": "fast"}, "learning_rate"),
    ({"lora_rank": "1.5"}, "lora_rank"),
    ({"packing": "maybe"}, "packing"),
    ({"lerning_rate": "1"}, None),
])
def test_parser_errors_are_placed_at_their_field(tmp_path, values, field):
    argv = form.values_to_argv({"train_file": "d.jsonl", **values})
    with pytest.raises(ConfigError) as cli:
        parse_config(argv)  # what `sftlab train` says
    res = form.check(tmp_path, {"values": {"train_file": "d.jsonl", **values}})
    assert not res["ok"]
    assert res["errors"] == {field or "_form": str(cli.value)}


def test_preflight_and_workspace_checks(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    res = form.check(tmp_path, {"values": {"train_file": "missing.jsonl", "output_dir": "saves/x"}})
    assert res["errors"] == {"train_file": "train_file: file not found: missing.jsonl"}
    res = form.check(tmp_path, {"values": {"train_file": "d.jsonl", "output_dir": "../elsewhere"}})
    assert "output_dir" in res["errors"] and "'..'" in res["errors"]["output_dir"]
    res = form.check(tmp_path, {"values": {"train_file": "/etc/hostname", "output_dir": "saves/x"}})
    assert "absolute" in res["errors"]["train_file"]
    res = form.check(tmp_path, {"values": {"train_file": "d.jsonl", "output_dir": "saves/x",
                                           "model_name_or_path": "../models/m"}})
    assert "model_name_or_path" in res["errors"]
    res = form.check(tmp_path, {"values": {"train_file": "d.jsonl", "output_dir": "saves/x", "cutoff_len": "4"}})
    assert res["errors"] == {"cutoff_len": "cutoff_len: 4 must be >= 8"}
    res = form.check(tmp_path, {"values": {"train_file": "d.jsonl", "output_dir": "saves/x"}, "preview": False})
    assert res["ok"] and res["argv"] == ["--train_file", "d.jsonl", "--output_dir", "saves/x"]


def test_yaml_editor_is_parsed_as_a_config_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    res = form.check(tmp_path, {"yaml": "train_file: d.jsonl\noutput_dir: saves/y\nlora_rank: 4\n", "preview": False})
    assert res["ok"] and res["argv"][0].startswith(form.YAML_DIR)
    assert parse_config(res["argv"]).finetuning.lora_rank == 4
    res = form.check(tmp_path, {"yaml": "train_file: [d.jsonl\n", "preview": False})
    assert not res["ok"] and "YAML line" in res["errors"]["_form"]
    res = form.check(tmp_path, {"yaml": "train_file: d.jsonl\nlora_rnak: 4\n", "preview": False})
    assert "lora_rank" in res["errors"]["_form"]


@pytest.mark.parametrize("model, ok", [("smollm2-135m-instruct", True), ("HuggingFaceTB/SmolLM2-135M", True),
                                       ("models/tiny", True), ("/opt/models/x", False), ("../x", False),
                                       ("a/b/../../../x", False)])
def test_model_paths(tmp_path, model, ok):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    if ok:
        form.check_model_path(tmp_path, model)
    else:
        with pytest.raises(ConfigError, match="model_name_or_path"):
            form.check_model_path(tmp_path, model)


def test_streaming_is_a_form_field_and_its_preview_does_not_tokenize_the_stream(tmp_path, monkeypatch):
    assert "streaming" in all_fields()
    data = tmp_path / "a.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n')

    def no_tokenizing(*a, **k):
        raise AssertionError("a streamed training set must not be tokenized ahead")

    monkeypatch.setattr("sftlab.report.data_report", no_tokenizing)
    cfg = parse_config(["--train_file", str(data), "--streaming", "true", "--max_steps", "5"])
    assert form.data_summary(cfg) == ["[train] streaming: the rows are read and tokenized during training "
                                      "(docs/STREAMING.md)"]
