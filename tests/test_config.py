"""sftlab.config: every option validated once, where it is parsed; one argv parser for every command."""

from __future__ import annotations

import pytest
import yaml

from sftlab.config import (
    DataArguments,
    FinetuningArguments,
    Option,
    build_config,
    config_from,
    parse_command,
    parse_config,
    save_config,
)
from sftlab.errors import ConfigError


@pytest.mark.parametrize("flag, value, choices", [
    ("train_on", "prompt", "completion, last_turn or all"),
    ("truncation", "cut", "keep_answer, drop or error"),
    ("rqa_context", "none_of_these", "gold or retrieved"),
    ("finetuning_type", "qlora", "lora, full or freeze"),
])
def test_a_bad_choice_is_refused_naming_the_option_and_its_choices(flag, value, choices):
    with pytest.raises(ConfigError) as e:
        parse_config([f"--{flag}", value])
    assert str(e.value) == f"{flag}: unknown value '{value}'; choose {choices}"


def test_choices_are_checked_for_yaml_and_code_too(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("finetuning:\n  finetuning_type: qlora\n")
    with pytest.raises(ConfigError, match="finetuning_type: unknown value 'qlora'"):
        parse_config([str(path)])
    with pytest.raises(ConfigError, match="truncation: unknown value 'cut'"):
        DataArguments(truncation="cut")
    with pytest.raises(ConfigError, match="tool_format: unknown value 'xml'; choose auto, template or builtin"):
        DataArguments(tool_format="xml")
    assert FinetuningArguments(finetuning_type="freeze").finetuning_type == "freeze"


@pytest.mark.parametrize("flag, value, message", [
    ("cutoff_len", "7", "cutoff_len: 7 must be >= 8"),
    ("loss_chunk_size", "0", "loss_chunk_size: 0 must be >= 1"),
    ("pad_tokens_to_multiple_of", "-1", "pad_tokens_to_multiple_of: -1 must be >= 0"),
])
def test_lower_bounds(flag, value, message):
    with pytest.raises(ConfigError) as e:
        parse_config([f"--{flag}", value])
    assert str(e.value) == message
    assert parse_config([f"--{flag}", str(int(value) + 1)]) is not None


def test_do_train_and_do_eval_follow_the_data_unless_given():
    cfg = build_config({"train_file": "a.jsonl", "eval_file": "b.jsonl"})
    assert cfg.training.do_train and cfg.training.do_eval and not cfg.training.do_predict
    cfg = build_config({"train_file": "a.jsonl", "val_size": 0.1})
    assert cfg.training.do_train and cfg.training.do_eval
    cfg = build_config({"eval_file": "b.jsonl", "do_train": False, "do_eval": False})
    assert not cfg.training.do_train and not cfg.training.do_eval
    assert not build_config({}).training.do_train


def test_parse_command_separates_own_options_from_config_flags():
    opts = (Option("out", "report", "where"), Option("n", 3, "how many", type=int),
            Option("dedup", False, "flag", type=bool))
    line = parse_command(["cfg.yaml", "--n", "5", "--dedup", "--lora_rank", "8", "--lora_target", "[q_proj, v_proj]"],
                         opts)
    assert line.target == "cfg.yaml"
    assert line.options == {"out": "report", "n": 5, "dedup": True}
    assert line.flags == {"lora_rank": "8", "lora_target": ["q_proj", "v_proj"]}
    with pytest.raises(ConfigError, match="--n: expected an integer, got 'many'"):
        parse_command(["--n", "many"], opts)
    with pytest.raises(ConfigError, match="sftlab x: --out is required"):
        parse_command([], (Option("out", required=True),), command="sftlab x")
    with pytest.raises(ConfigError, match="sftlab ui: unknown option '--prot'; did you mean '--port'"):
        parse_command(["--prot", "1"], (Option("port", 1, type=int),), command="sftlab ui", takes_config=False)


def test_text_flags_are_read_as_typed_by_every_command(tmp_path, monkeypatch):
    """`sftlab predict` reads a flag exactly as `sftlab train` does: '[/INST]' stays a prefix, 'yes' stays text."""
    import sftlab.workflow as workflow
    from sftlab.cli import main

    seen = []
    monkeypatch.setattr(workflow, "run_sft", lambda cfg, callbacks=None: seen.append(cfg) or {})
    flags = ["--assistant_prefix", "[/INST]", "--system", "yes", "--test_file", "t.jsonl",
             "--output_dir", str(tmp_path / "o")]
    assert main(["train", "--train_file", "a.jsonl", *flags]) == 0
    assert main(["predict", "some-model", *flags]) == 0
    for cfg in seen:
        assert cfg.data.assistant_prefix == "[/INST]" and cfg.data.system == "yes"
    assert seen[0].training.do_train and not seen[1].training.do_train and seen[1].training.do_predict


def test_saved_config_reads_back_the_same(tmp_path):
    cfg = parse_config(["--train_file", "a.jsonl", "--train_on", "last_turn", "--lora_rank", "4",
                        "--output_dir", str(tmp_path)])
    path = tmp_path / "sftlab_config.yaml"
    save_config(cfg, str(path))
    again = config_from(str(path), {})
    assert again.data.train_on == "last_turn" and again.finetuning.lora_rank == 4
    assert yaml.safe_load(path.read_text())["data"]["train_file"] == ["a.jsonl"]


def test_help_lists_the_choices_of_choice_options(capsys):
    from sftlab.cli import main
    from sftlab.config import help_text

    text = help_text()
    # Literal-typed fields (sftlab's groups) and enum-typed ones (TrainingArguments), written out independently.
    for line in ("--train_on {completion,last_turn,all} (default: 'completion')",
                 "--truncation {keep_answer,drop,error} (default: 'keep_answer')",
                 "--rqa_context {gold,retrieved} (default: 'gold')",
                 "--finetuning_type {lora,full,freeze} (default: 'lora')",
                 "--eval_strategy {no,steps,epoch} (default: 'no')"):
        assert line in text, line
    assert "--cutoff_len (default: 1024)" in text  # no braces for a free value
    assert main(["export", "-h"]) == 0
    assert "--format {hf,gguf} (default: 'hf')" in capsys.readouterr().out
    assert main(["data", "preview", "-h"]) == 0
    assert "--format {text,json} (default: 'text')" in capsys.readouterr().out
    assert main(["chat", "-h"]) == 0
    assert "--tools (default: None)" in capsys.readouterr().out
