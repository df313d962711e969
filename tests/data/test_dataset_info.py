"""Dataset names through dataset_dir/dataset_info.json: every mapping kind (alpaca columns, sharegpt columns and
tags), LLaMA-Factory's glaive demo with tools, and the errors, which come while the config is read (before any
model loads) and name dataset_info.json and the entry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.config import parse_config
from sftlab.data.dataset import tokenize_files
from sftlab.data.templates import load_template
from sftlab.data.tools import tools_block
from sftlab.errors import DataError
from sftlab.data.splits import encode_settings
from tests.data.test_tools import trained_runs

ASSETS = Path(__file__).parent.parent / "assets" / "llamafactory" / "data"
FN = {"name": "lookup", "description": "Look a word up", "parameters": {"type": "object"}}
DIALOG = [{"role": "customer", "text": "Define cat"},
          {"role": "call", "text": json.dumps({"name": "lookup", "arguments": {"word": "cat"}})},
          {"role": "result", "text": "feline"},
          {"role": "agent", "text": "A feline."}]


def write(path: Path, obj) -> str:
    path.write_text(json.dumps(obj))
    return path.name


@pytest.fixture()
def data_dir(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    info = {
        "alpaca_renamed": {
            "file_name": write(d / "a.json", [{"q": "Define", "ctx": "cat", "a": "A small feline.",
                                               "hist": [["Hi", "Hello."]], "sys": "Be exact.", "fns": [FN]}]),
            "columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "hist", "system": "sys",
                        "tools": "fns"}},
        "sharegpt_tagged": {
            "file_name": write(d / "s.json", [{"dialog": DIALOG, "sys_prompt": "Be exact.", "fns": [FN]},
                                              {"dialog": [{"role": "sys", "text": "Be exact."}, *DIALOG],
                                               "fns": [FN]}]),
            "formatting": "sharegpt",
            "columns": {"messages": "dialog", "system": "sys_prompt", "tools": "fns"},
            "tags": {"role_tag": "role", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent",
                     "observation_tag": "result", "function_tag": "call", "system_tag": "sys"}},
        "glaive_toolcall_en_demo": json.loads((ASSETS / "dataset_info.json").read_text())["glaive_toolcall_en_demo"],
        "on_the_hub": {"hf_hub_url": "someone/data"},
        "pictures": {"file_name": "s.json", "formatting": "sharegpt", "columns": {"messages": "dialog",
                                                                                  "images": "images"}},
    }
    (d / "glaive_toolcall_en_demo.json").write_text((ASSETS / "glaive_toolcall_en_demo.json").read_text())
    (d / "dataset_info.json").write_text(json.dumps(info))
    return d


def encode(cfg, tok, split_files, tmp_path):
    t = load_template("chatml", tok, data_args=cfg.data)
    return tokenize_files(split_files, "train", tok, t, encode_settings(cfg), cache_dir=str(tmp_path / "cache"))


def test_alpaca_columns(data_dir, tmp_path, smol_tokenizer):
    cfg = parse_config(["--dataset", "alpaca_renamed", "--dataset_dir", str(data_dir)])
    assert cfg.data.train_file == [str(data_dir / "a.json")]
    (ex,), _ = encode(cfg, smol_tokenizer, cfg.data.train_file, tmp_path)
    assert smol_tokenizer.decode(ex["input_ids"]) == (
        "<|im_start|>system\nBe exact.\n\n" + tools_block([{"type": "function", "function": FN}]) + "<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello."
        "<|im_end|>\n<|im_start|>user\nDefine\ncat<|im_end|>\n<|im_start|>assistant\nA small feline.<|im_end|>\n")


def test_sharegpt_columns_and_tags(data_dir, tmp_path, smol_tokenizer):
    """Roles by the entry's tags (customer, agent, call = the function tag, result = the observation tag), turns by
    its role/content tags, conversation, system and tools by its columns."""
    cfg = parse_config(["--dataset", "sharegpt_tagged", "--dataset_dir", str(data_dir)])
    (ex, same), _ = encode(cfg, smol_tokenizer, cfg.data.train_file, tmp_path)
    assert ex == same  # the system column and a system-tagged turn read alike
    text = smol_tokenizer.decode(ex["input_ids"])
    assert text.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n") and json.dumps(FN) in text
    assert text.endswith("<|im_start|>user\nDefine cat<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
                         '{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call><|im_end|>\n'
                         "<|im_start|>user\n<tool_response>\nfeline\n</tool_response><|im_end|>\n"
                         "<|im_start|>assistant\nA feline.<|im_end|>\n")
    from sftlab.data.tokenize import Encoded

    assert trained_runs(smol_tokenizer, Encoded(ex["input_ids"], ex["labels"])) == [
        '<tool_call>\n{"name": "lookup", "arguments": {"word": "cat"}}\n</tool_call><|im_end|>', "A feline.<|im_end|>"]


def test_llamafactory_glaive_demo_by_name(data_dir, tmp_path, smol_tokenizer):
    cfg = parse_config(["--dataset", "glaive_toolcall_en_demo", "--dataset_dir", str(data_dir)])
    examples, summary = encode(cfg, smol_tokenizer, cfg.data.train_file, tmp_path)
    assert summary.kept == 3 and summary.formats == {"sharegpt": 3}
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in \
        smol_tokenizer.decode(examples[0]["input_ids"])


@pytest.mark.parametrize("name,needle", [
    ("alpaca_renamd", "dataset_info.json: dataset 'alpaca_renamd' is neither a file nor a name listed there; "
                      "did you mean 'alpaca_renamed'?"),
    ("on_the_hub", "dataset_info.json, field 'on_the_hub.file_name': no file_name (hf_hub_url is a download"),
    ("pictures", "field 'pictures.columns.images': column 'images': multimodal data is not supported"),
])
def test_bad_names_fail_while_reading_the_config(data_dir, name, needle):
    with pytest.raises(DataError) as e:
        parse_config(["--dataset", f"{name}", "--dataset_dir", str(data_dir)])
    assert needle in str(e.value)
