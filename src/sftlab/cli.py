"""`sftlab train | data preview | predict | chat | export | index` — thin wrappers over the workflow.

Every user-fixable problem arrives here as an SftlabError and is printed as one clear line (exit code 2), never as
a traceback."""

from __future__ import annotations

import os
import sys

from typing import Literal

from sftlab.config import Option
from sftlab.errors import ConfigError, SftlabError
from sftlab.logs import log, prepare_process

USAGE = """usage: sftlab <command> [CONFIG.yaml] [--key value ...]

commands:
  train          fine-tune (sftlab train -h lists every option, TrainingArguments included)
  data preview   show what exactly is trained: sftlab data preview [CONFIG] [--n N] [--format text|json]
  data report    lengths, truncation, duplicates, contamination and cost: sftlab data report [CONFIG] [--out DIR]
                 [--dedup] [--no_probe]
  predict        evaluate/predict with a model or output dir: sftlab predict CONFIG_OR_OUTPUT_DIR [--key value]
  chat           interactive chat: sftlab chat --model OUTPUT_DIR [--tools tools.json]
  export         merge a LoRA adapter: sftlab export --model OUTPUT_DIR --out DIR
                 or a GGUF for llama.cpp/Ollama: sftlab export --model OUTPUT_DIR --format gguf
                 [--quantization f16|q8_0|q4_k_m|...] --out FILE.gguf (docs/GGUF.md)
  index          build a retrieval index: sftlab index --documents FILE --embedding_model NAME --out DIR
  ui             local web app: sftlab ui [--workspace DIR] [--host 127.0.0.1] [--port 7860] [--token T]

every command also takes --verbose: implementation details (speed paths, caches, template) in the log
"""


def cmd_train(argv: list[str]) -> int:
    from sftlab.config import help_text, parse_config
    from sftlab.workflow import run_sft

    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    run_sft(parse_config(argv))
    return 0


def cmd_predict(argv: list[str]) -> int:
    """Predict/evaluate from a config file, or from an output directory using the config saved in it."""
    from sftlab.config import build_config, help_text, parse_command
    from sftlab.workflow import run_sft

    if "-h" in argv or "--help" in argv:
        print("usage: sftlab predict CONFIG.yaml | OUTPUT_DIR | MODEL [--key value ...]\n\n" + help_text())
        return 0
    line = parse_command(argv, command="sftlab predict")
    if not line.target:
        raise ConfigError("sftlab predict: give a config file or an output directory")
    raw = {**_predict_base(line.target), **line.flags}
    raw["do_train"] = False
    raw.setdefault("do_predict", bool(raw.get("test_file")))
    raw.setdefault("do_eval", bool(raw.get("eval_file")))
    if not (raw["do_predict"] or raw["do_eval"]):
        raise ConfigError("sftlab predict: pass --test_file (generation) and/or --eval_file (loss, accuracy)")
    raw.pop("val_size", None)
    run_sft(build_config(raw))
    return 0


def _predict_base(target: str) -> dict:
    """The options `sftlab predict TARGET` starts from: an output directory's saved config (its data, generation
    and rqa settings, and the precision it trained in), a YAML file, or a model name."""
    import yaml

    from sftlab.config import _read_yaml

    if target.endswith((".yaml", ".yml")) and not os.path.isdir(target):
        return _read_yaml(target)
    raw: dict = {"model_name_or_path": target}
    if not os.path.isdir(target):  # a model name: the bundled model, a cached hub id or a .gguf file
        name = os.path.basename(target.rstrip("/")).replace(".gguf", "")
        raw["output_dir"] = os.path.join("saves", "predict-" + name)
        return raw
    saved = os.path.join(target, "sftlab_config.yaml")
    if os.path.isfile(saved):
        groups = yaml.safe_load(open(saved, encoding="utf-8")) or {}
        keep_training = ("bf16", "fp16", "per_device_eval_batch_size", "seed", "dataloader_num_workers")
        for g in ("data", "generating", "rqa"):
            raw.update({k: v for k, v in (groups.get(g) or {}).items() if v is not None})
        raw.update({k: v for k, v in (groups.get("training") or {}).items() if k in keep_training})
        raw.pop("train_file", None)
        raw["model_name_or_path"] = target
    raw["output_dir"] = os.path.join(target, "predict")
    return raw


CHAT_OPTIONS = (Option("tools", None, "a JSON file of tool definitions (OpenAI or bare functions)"),)


def cmd_chat(argv: list[str]) -> int:
    from sftlab.chat import chat_loop, load_for_chat
    from sftlab.config import command_help, config_from, parse_command

    if "-h" in argv or "--help" in argv:
        print(command_help("sftlab chat --model OUTPUT_DIR [--key value ...] (generation options of `sftlab train`)",
                           CHAT_OPTIONS))
        return 0
    line = parse_command(argv, CHAT_OPTIONS, command="sftlab chat")
    tools = read_tools_file(line.options["tools"]) if line.options["tools"] else None
    m, tok, template, cfg = load_for_chat(config_from(line.target, line.flags))  # --model: --model_name_or_path
    print(f"sftlab chat with {cfg.model.model_name_or_path} (template '{template.name}')")
    if tools:
        print(f"{len(tools)} tools; {template.describe_tools()}")
    chat_loop(m, tok, template, cfg.generating, system=cfg.data.system, tools=tools)
    return 0


def read_tools_file(path: str) -> list[dict] | None:
    """Tool definitions for chat: a JSON file holding a list of functions (OpenAI or bare), checked like a row's."""
    from pathlib import Path

    from sftlab.data.formats import row_tools
    from sftlab.data.loader import Row

    try:
        data = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--tools: cannot read {path}: {e.strerror or e}") from None
    return row_tools(Row({"tools": data}, path, 1))


EXPORT_OPTIONS = (
    Option("model", help="the output directory (LoRA adapter) or model to export", required=True),
    Option("out", help="merged model directory (hf) or FILE.gguf (gguf)", required=True),
    Option("format", "hf", "hf: a merged transformers directory; gguf: a GGUF file for llama.cpp / Ollama",
           type=Literal["hf", "gguf"]),
    Option("quantization", "f16", "gguf only: f32, f16, bf16, q8_0, q4_k_m, ... (docs/GGUF.md)"),
)


def cmd_export(argv: list[str]) -> int:
    from sftlab.config import command_help, config_from, parse_command

    if "-h" in argv or "--help" in argv:
        print(command_help("sftlab export --model OUTPUT_DIR --out DIR|FILE.gguf [--format hf|gguf]", EXPORT_OPTIONS))
        return 0
    line = parse_command(argv, EXPORT_OPTIONS, command="sftlab export")
    opts = line.options
    cfg = config_from(line.target, {**line.flags, "model_name_or_path": opts["model"]})
    if opts["format"] == "gguf":
        return _export_gguf(cfg, opts["model"], opts["out"], opts["quantization"])
    return _export_merged(cfg, opts["model"], opts["out"])


def _export_merged(cfg, model: str, out: str) -> int:
    from sftlab.data.templates import save_template
    from sftlab.models.load import adapter_base, load_model, load_tokenizer
    from sftlab.data.templates import resolve_template
    from sftlab.workflow import check_writable

    if not os.path.isdir(model) or adapter_base(model) is None:
        raise ConfigError(f"--model: {model} holds no LoRA adapter (adapter_config.json); nothing to merge")
    check_writable(out)
    m, base = load_model(cfg.model, None, for_training=False, bf16=False)  # merged in fp32: exact
    tok = load_tokenizer(model)
    template = resolve_template(cfg, tok, model)
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_template(template, out)
    print(f"merged {model} into {base} -> {out} (loads with transformers' AutoModelForCausalLM)")
    return 0


def _export_gguf(cfg, model: str, out: str, quantization: str) -> int:
    """Check everything, load (LoRA merged in fp32), write FILE.gguf and FILE.Modelfile beside it."""
    from sftlab.export.chat_template import generation_prompt_tail
    from sftlab.export.gguf import export_gguf, plan_export
    from sftlab.export.modelfile import write_modelfile
    from sftlab.models.load import load_model, load_tokenizer
    from sftlab.data.templates import resolve_template

    plan = plan_export(model, out, quantization, cfg.model.cache_dir)
    m, _ = load_model(cfg.model, None, for_training=False, bf16=False)
    tok = load_tokenizer(plan.tokenizer_path)
    template = resolve_template(cfg, tok, plan.model_path)
    path = export_gguf(plan, m, tok, template)
    write_modelfile(plan.modelfile, path, template, generation_prompt_tail(template, tok), cfg.generating)
    size = path.stat().st_size / 2**20
    print(f"{model} -> {path} ({plan.quantization}, {size:.1f} MiB, chat template '{template.name}') and "
          f"{plan.modelfile}\n  llama.cpp: llama-cli -m {path} --jinja   Ollama: ollama create NAME -f {plan.modelfile}"
          f"\n  back into sftlab: sftlab chat --model {path}")
    return 0


PREVIEW_OPTIONS = (
    Option("n", 3, "examples shown", type=int),
    Option("format", "text", "text (trained tokens marked) or json", type=Literal["text", "json"]),
)
REPORT_OPTIONS = (
    Option("out", "data_report", "where data_report.md, data_report.json and the figures are written"),
    Option("dedup", False, "also write cleaned copies of the data without the duplicates found", type=bool),
    Option("no_probe", False, "skip the measured probe (a few real steps) behind the time estimate", type=bool),
)
DATA_USAGE = ("usage: sftlab data preview [CONFIG.yaml] [--key value ...] [--n N] [--format text|json]\n"
              "       sftlab data report [CONFIG.yaml] [--key value ...] [--out DIR] [--dedup] [--no_probe]\n"
              "  the config and flags of `sftlab train`")


def cmd_data(argv: list[str]) -> int:
    from sftlab.config import command_help, config_from, parse_command

    commands = {"preview": (PREVIEW_OPTIONS, _data_preview), "report": (REPORT_OPTIONS, _data_report)}
    if not argv or argv[0] not in commands:
        raise ConfigError(DATA_USAGE)
    options, run = commands[argv[0]]
    if "-h" in argv or "--help" in argv:
        print(command_help(f"sftlab data {argv[0]} [CONFIG.yaml] [--key value ...]", options))
        return 0
    line = parse_command(argv[1:], options, command=f"sftlab data {argv[0]}")
    return run(config_from(line.target, line.flags), **line.options)


def _data_preview(cfg, n: int, format: str) -> int:
    from sftlab.preview import preview

    preview(cfg, n=n, fmt=format, out=sys.stdout)
    return 0


def _data_report(cfg, out: str, dedup: bool, no_probe: bool) -> int:
    from sftlab.report import data_report, write_report

    report = data_report(cfg, out_dir=out, dedup=dedup, probe=not no_probe,
                         log=log.info)
    paths = write_report(report, out)
    for line in report.summary_lines():
        print(line)
    print(f"report: {paths['markdown']} (every number in {paths['json']})")
    return 0


def cmd_index(argv: list[str]) -> int:
    from sftlab.rqa.cli_index import main as index_main

    return index_main(argv)


UI_OPTIONS = (
    Option("workspace", ".", "the folder whose runs are shown and where new runs are written"),
    Option("host", "127.0.0.1", "address to serve on; other than 127.0.0.1/localhost requires the access token"),
    Option("port", 7860, "port to serve on", type=int),
    Option("token", None, "access token (generated and printed unless given)"),
    Option("max_parallel_runs", 1, "training runs at the same time", type=int),
)


def cmd_ui(argv: list[str]) -> int:
    """The local web app (sftlab.ui): runs, curves, new runs, compare, chat."""
    from sftlab.config import command_help, parse_command
    from sftlab.ui.app import serve

    if "-h" in argv or "--help" in argv:
        print(command_help("sftlab ui [--key value ...]", UI_OPTIONS))
        return 0
    line = parse_command(argv, UI_OPTIONS, command="sftlab ui", takes_config=False)
    if line.target:
        raise ConfigError(f"sftlab ui: unexpected argument {line.target}")
    o = line.options
    serve(o["workspace"], host=o["host"], port=o["port"], token=o["token"], max_parallel=o["max_parallel_runs"])
    return 0


COMMANDS = {"train": cmd_train, "predict": cmd_predict, "chat": cmd_chat, "export": cmd_export,
            "data": cmd_data, "index": cmd_index, "ui": cmd_ui}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd = argv.pop(0)
    if cmd not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(cmd, list(COMMANDS), n=1)
        print(f"sftlab: unknown command '{cmd}'" + (f"; did you mean '{close[0]}'?" if close else ""), file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    prepare_process()
    try:
        return COMMANDS[cmd](argv)
    except SftlabError as e:
        print(f"sftlab {cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nsftlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
