"""Dataset names resolved through `dataset_dir/dataset_info.json`, LLaMA-Factory's registry of local data.

An entry names its file (`file_name`, relative to dataset_dir; a folder means every data file in it), its
`formatting` (alpaca or sharegpt), the `columns` its rows use for LLaMA-Factory's fields (alpaca: prompt, query,
response, history, system, tools; sharegpt: messages, system, tools) and, for sharegpt, the `tags` of its turns
(role_tag, content_tag, user_tag, assistant_tag, observation_tag, function_tag, system_tag). Each becomes a path
and a `FileFormat` (format, column renames, role names, turn keys) that applies to that file only.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from sftlab.data.formats import FileFormat
from sftlab.errors import DataError

INFO_FILE = "dataset_info.json"
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
# LLaMA-Factory's column names -> sftlab's row fields, per formatting.
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools"}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": "system", "tools": "tools"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
             "function_tag": "function_call", "system_tag": "system"}
UNSUPPORTED_COLUMNS = {"images": "multimodal data", "videos": "multimodal data", "audios": "multimodal data",
                       "chosen": "preference data", "rejected": "preference data", "kto_tag": "preference data"}


def read_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON: {e.msg}", file=str(path), line=e.lineno) from None
    if not isinstance(info, dict):
        raise DataError("expected an object of dataset name -> entry", file=str(path))
    return info


def _mapping(entry: dict, key: str, info: Path, name: str) -> dict[str, str]:
    value = entry.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise DataError("expected an object of name -> string", file=str(info), field=f"{name}.{key}")
    return value


def file_format(entry: dict, info: Path, name: str) -> FileFormat:
    """How rows of the entry's file read, in sftlab's terms."""
    where = str(info)
    if entry.get("ranking"):
        raise DataError("ranking (preference) data is not supported: sftlab does supervised fine-tuning",
                        file=where, field=f"{name}.ranking")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"formatting '{formatting}' is not supported; choose alpaca or sharegpt",
                        file=where, field=f"{name}.formatting")
    columns = _mapping(entry, "columns", info, name)
    known = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    for col in columns:
        if col in UNSUPPORTED_COLUMNS:
            raise DataError(f"column '{col}': {UNSUPPORTED_COLUMNS[col]} is not supported by sftlab",
                            file=where, field=f"{name}.columns.{col}")
        if col not in known:
            raise DataError(f"unknown column '{col}' for {formatting} data; known: {sorted(known)}",
                            file=where, field=f"{name}.columns.{col}")
    renames = {columns[col]: ours for col, ours in known.items() if col in columns and columns[col] != ours}
    if formatting == "alpaca":
        return FileFormat("alpaca", renames)
    tags = _mapping(entry, "tags", info, name)
    for tag in tags:
        if tag not in SHAREGPT_TAGS:
            raise DataError(f"unknown tag '{tag}'; known: {sorted(SHAREGPT_TAGS)}", file=where, field=f"{name}.tags.{tag}")
    tags = {**SHAREGPT_TAGS, **tags}
    roles = {tags[tag]: role for tag, role in TAG_ROLES.items()}
    return FileFormat("sharegpt", renames, roles, {"role": tags["role_tag"], "content": tags["content_tag"]})


def entry_files(entry: dict, dataset_dir: Path, info: Path, name: str) -> list[str]:
    file_name = entry.get("file_name")
    if not isinstance(file_name, str) or not file_name:
        remote = [k for k in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if entry.get(k)]
        hint = (f" ({remote[0]} is a download, and sftlab does not download data: save the data locally and "
                "give file_name)") if remote else ""
        raise DataError(f"no file_name{hint}", file=str(info), field=f"{name}.file_name")
    path = dataset_dir / file_name
    if path.is_dir():
        files = sorted(str(p) for p in path.iterdir() if p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(DATA_SUFFIXES)} file", file=str(info),
                            field=f"{name}.file_name")
        return files
    if not path.is_file():
        raise DataError(f"file not found: {path}", file=str(info), field=f"{name}.file_name")
    return [str(path)]


def resolve_names(entries: list[str], dataset_dir: str, file_formats: dict[str, dict]) -> list[str]:
    """Paths for a list of dataset names and paths: an existing path stays; a name listed in
    dataset_dir/dataset_info.json becomes its file(s), their format recorded in `file_formats`."""
    info_path = Path(dataset_dir) / INFO_FILE
    info = read_info(info_path) if info_path.is_file() else None
    out: list[str] = []
    for name in entries:
        if Path(name).exists() or info is None or (name not in info and "/" in name):
            out.append(name)  # a path, or a hub id for the offline cache, as before
            continue
        if name not in info:
            close = difflib.get_close_matches(name, list(info), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise DataError(f"dataset '{name}' is neither a file nor a name listed there{hint} "
                            f"(names: {', '.join(sorted(info)[:20])})", file=str(info_path))
        entry = info[name]
        if not isinstance(entry, dict):
            raise DataError(f"expected an object, found {type(entry).__name__}", file=str(info_path), field=name)
        fmt = asdict(file_format(entry, info_path, name))
        for path in entry_files(entry, Path(dataset_dir), info_path, name):
            out.append(path)
            file_formats[path] = fmt
    return out


def resolve_dataset_names(data) -> None:
    """train_file / eval_file / test_file names resolved in place on a DataArguments."""
    for attr in ("train_file", "eval_file", "test_file"):
        entries = getattr(data, attr)
        if entries:
            setattr(data, attr, resolve_names(list(entries), data.dataset_dir, data.file_formats))
