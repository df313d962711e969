"""The new-run form: generated from the config dataclasses and their help text (the same ones `sftlab train -h`
lists), turned into `sftlab train` flags, validated by `parse_config` + `preflight` (what `sftlab train` runs first),
and previewed by `sftlab.preview` (what `sftlab data preview --format json` prints)."""

from __future__ import annotations

import dataclasses
import enum
import functools
import io
import json
import re
import time
import typing
from pathlib import Path
from typing import Any

import yaml

from sftlab.config import (BUNDLED_MODEL, GROUPS, TRAINING_DEFAULTS, _type_of, all_fields, literal_choices,
                           parse_config, training_fields)
from sftlab.errors import ConfigError, SftlabError
from sftlab.ui.workspace import OutsideWorkspace, resolve_inside

# TrainingArguments shown open in the form; every other one is in the collapsed "all TrainingArguments" group.
COMMON_TRAINING = ("output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                   "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps",
                   "logging_steps", "save_steps", "eval_strategy", "eval_steps", "do_predict", "bf16", "seed",
                   "gradient_checkpointing")
PATH_FIELDS = ("train_file", "eval_file", "test_file", "output_dir")
YAML_DIR = ".sftlab-ui/configs"  # YAML-editor configs, kept so a run's argv stays valid (hidden: not a run)


def _kind(tp: Any) -> tuple[str, list[str] | None]:
    """How a field is edited: bool, int, float, text, list, mapping; Literal and enum types give their choices."""
    literal = literal_choices(tp)
    if literal:
        return "choice", [str(c) for c in literal]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:
            return "choice", [e.value for e in enums[0]]
        tp = args[0] if len(args) == 1 else (str if str in args else args[0])
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "choice", [e.value for e in tp]
    origin = typing.get_origin(tp)
    if tp is bool:
        return "bool", None
    if tp is int:
        return "int", None
    if tp is float:
        return "float", None
    if origin in (list, tuple) or tp is list:
        return "list", None
    if origin is dict or tp is dict:
        return "mapping", None
    return "text", None


def _display(v: Any) -> str:
    if v is None or v is dataclasses.MISSING:
        return ""
    if isinstance(v, enum.Enum):
        v = v.value
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, dict)):
        return ",".join(map(str, v)) if isinstance(v, list) else json.dumps(v)
    return str(v)


def _field_entry(name: str, cls: type, f: dataclasses.Field, default: Any) -> dict[str, Any]:
    kind, choices = _kind(_type_of(cls, name))
    meta_choices = f.metadata.get("choices")
    if meta_choices:
        kind, choices = "choice", [str(c) for c in meta_choices]
    return {"name": name, "kind": kind, "choices": choices, "default": _display(default),
            "help": " ".join(str(f.metadata.get("help", "")).split())}


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


@functools.lru_cache(maxsize=1)
def form_schema() -> list[dict[str, Any]]:
    """Groups of fields: sftlab's five, the common TrainingArguments, then every other TrainingArguments flag."""
    from transformers import Seq2SeqTrainingArguments

    groups = []
    for group, cls in GROUPS.items():
        fields = [_field_entry(f.name, cls, f, _default(f)) for f in dataclasses.fields(cls)]
        groups.append({"group": group, "open": group in ("model", "data", "finetuning"), "fields": fields})
    tf = training_fields()
    entry = {n: _field_entry(n, Seq2SeqTrainingArguments, f, TRAINING_DEFAULTS.get(n, _default(f)))
             for n, f in tf.items()}
    groups.insert(3, {"group": "training", "open": True, "fields": [entry[n] for n in COMMON_TRAINING if n in entry]})
    groups.append({"group": "all TrainingArguments", "open": False,
                   "fields": [e for n, e in entry.items() if n not in COMMON_TRAINING]})
    return groups


def values_to_argv(values: dict[str, str]) -> list[str]:
    """`--name value` for every field the user filled in (names checked by the parser, not here)."""
    argv = []
    for name, value in values.items():
        if value is None or str(value).strip() == "":
            continue
        argv += [f"--{name}", str(value)]
    return argv


_OPTION = re.compile(r"--([A-Za-z_][\w]*)|^([A-Za-z_]\w*)[:=\s]|'([A-Za-z_]\w*)'")


def error_field(message: str) -> str | None:
    """The option an error message names (the parser's messages start with '--key:' or 'key:')."""
    m = _OPTION.search(message)  # the first one: "unknown option '--lr'; did you mean '--x'" names no field
    name = next((g for g in m.groups() if g), None) if m else None
    return name if name in all_fields() else None


def _check_paths(workspace: Path, cfg) -> None:
    """Data, output and local model paths must lie inside the workspace."""
    d = cfg.data
    for name in ("train_file", "eval_file", "test_file"):
        for p in getattr(d, name) or []:
            try:
                resolve_inside(workspace, p)
            except OutsideWorkspace as e:
                raise ConfigError(f"{name}: {e}") from None
    try:
        resolve_inside(workspace, cfg.training.output_dir)
    except OutsideWorkspace as e:
        raise ConfigError(f"output_dir: {e}") from None
    check_model_path(workspace, cfg.model.model_name_or_path)


def check_model_path(workspace: Path, model: str) -> None:
    """A local model (a path, or a name that exists in the workspace) must lie inside the workspace; the bundled
    model and hub ids (org/name, read from the local cache) are names, not paths."""
    looks_like_path = model.startswith(("/", ".", "~")) or (workspace / model).exists() or model.count("/") > 1
    if model != BUNDLED_MODEL and looks_like_path:
        try:
            resolve_inside(workspace, model)
        except OutsideWorkspace as e:
            raise ConfigError(f"model_name_or_path: {e}") from None


def write_yaml(workspace: Path, text: str) -> str:
    """The YAML editor's text as a file under the workspace (the run's argv names it); returns its relative path."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"YAML{' line ' + str(mark.line + 1) if mark else ''}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("YAML: expected a mapping of option: value")
    folder = workspace / YAML_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns() % 1000000:06d}.yaml"
    path.write_text(text, encoding="utf-8")
    return path.relative_to(workspace).as_posix()


def request_argv(workspace: Path, body: dict[str, Any]) -> list[str]:
    """The `sftlab train` arguments of a form submission ({"values": {...}}) or a YAML one ({"yaml": "..."})."""
    if body.get("yaml"):
        return [write_yaml(workspace, str(body["yaml"]))]
    values = body.get("values") or {}
    if not isinstance(values, dict):
        raise ConfigError("values: expected a mapping of option: value")
    return values_to_argv({str(k): v for k, v in values.items()})


def validate(workspace: Path, argv: list[str]):
    """The config `sftlab train argv` would run with, after the checks it runs first (run in the workspace)."""
    from sftlab.workflow import preflight

    cfg = parse_config(argv)
    _check_paths(workspace, cfg)
    preflight(cfg)
    return cfg


def preview_rows(argv: list[str], n: int = 3) -> list[dict[str, Any]]:
    """`sftlab data preview --format json --n n` for the same arguments, as records."""
    from sftlab.config import parse_config
    from sftlab.preview import preview

    buf = io.StringIO()
    preview(parse_config(list(argv)), n=n, fmt="json", out=buf)
    return [json.loads(l) for l in buf.getvalue().splitlines() if l.strip()]


def data_summary(cfg) -> list[str]:
    """The data report's summary when sftlab has one, else the tokenizer's per-split summary line."""
    if cfg.data.streaming:  # the rows are read while training; tokenizing them all here is what streaming avoids
        return ["[train] streaming: the rows are read and tokenized during training (docs/STREAMING.md)"]
    try:
        from sftlab.report import data_report
    except ImportError:
        data_report = None
    if data_report is not None:
        report = data_report(cfg, probe=False)
        return list(report.summary_lines()) if hasattr(report, "summary_lines") else [str(report)]
    from sftlab.data.dataset import tokenize_files
    from sftlab.models.load import load_tokenizer, resolve_model_path
    from sftlab.data.templates import resolve_template
    from sftlab.data.splits import encode_settings

    d = cfg.data
    path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    tok = load_tokenizer(path)
    template = resolve_template(cfg, tok, path)
    lines = []
    for split, files in (("train", d.train_file), ("eval", d.eval_file)):
        if files:
            _, summary = tokenize_files(files, split, tok, template, encode_settings(cfg), max_samples=d.max_samples,
                                        cache_dir=d.data_cache_dir)
            lines.append(summary.line())
    return lines


def check(workspace: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Validation + preview for the form: {"ok", "argv", "errors": {field: message}, "summary", "examples"}."""
    try:
        argv = request_argv(workspace, body)
        cfg = validate(workspace, argv)
    except SftlabError as e:
        return {"ok": False, "errors": {error_field(str(e)) or "_form": str(e)}}
    out: dict[str, Any] = {"ok": True, "argv": argv, "output_dir": cfg.training.output_dir, "errors": {}}
    if body.get("preview", True):
        try:
            out["summary"] = data_summary(cfg)
            out["examples"] = preview_rows(argv, int(body.get("n", 3)))
        except SftlabError as e:
            return {"ok": False, "errors": {error_field(str(e)) or "_form": str(e)}}
    return out
