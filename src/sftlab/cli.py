"""`sftlab train | data preview | predict | chat | export | index` — thin wrappers over the workflow.

Every user-fixable problem arrives here as an SftlabError and is printed as one clear line (exit code 2), never as
a traceback."""

from __future__ import annotations

import os
import sys

from sftlab.errors import ConfigError, SftlabError

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
"""


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    try:  # per-tensor "Loading weights" bars drown the progress line that matters
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:
        pass
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _pop_opt(argv: list[str], name: str, default=None):
    """Remove --name value (or --name=value) from argv and return the value."""
    for i, a in enumerate(argv):
        if a == f"--{name}" and i + 1 < len(argv):
            v = argv[i + 1]
            del argv[i:i + 2]
            return v
        if a.startswith(f"--{name}="):
            del argv[i]
            return a.split("=", 1)[1]
    return default


def cmd_train(argv: list[str]) -> int:
    from sftlab.config import help_text, parse_config

    if "-h" in argv or "--help" in argv:
        print(help_text())
        return 0
    cfg = parse_config(argv)
    from sftlab.workflow import run_sft

    if "do_train" not in cfg.explicit and cfg.data.train_file:
        cfg.training.do_train = True  # `sftlab train` trains unless told otherwise
    if "do_eval" not in cfg.explicit and (cfg.data.eval_file or cfg.data.val_size):
        cfg.training.do_eval = True
    run_sft(cfg)
    return 0


def cmd_predict(argv: list[str]) -> int:
    """Predict/evaluate from a config file, or from an output directory using the config saved in it."""
    import yaml

    from sftlab.config import build_config, help_text, parse_argv
    from sftlab.workflow import run_sft

    if "-h" in argv or "--help" in argv:
        print("usage: sftlab predict CONFIG.yaml | OUTPUT_DIR | MODEL [--key value ...]\n\n" + help_text())
        return 0
    if not argv:
        raise ConfigError("sftlab predict: give a config file or an output directory")
    target, rest = argv[0], argv[1:]
    raw: dict = {}
    if os.path.isdir(target):
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
    elif target.endswith((".yaml", ".yml")):
        from sftlab.config import _read_yaml

        raw.update(_read_yaml(target))
    else:  # a model name: the bundled model, a cached hub id or a .gguf file
        raw["model_name_or_path"] = target
        raw["output_dir"] = os.path.join("saves", "predict-" + os.path.basename(target.rstrip("/")).replace(".gguf", ""))
    _, flags = parse_argv(rest)
    for k, v in flags.items():
        try:
            raw[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            raw[k] = v
    raw["do_train"] = False
    raw.setdefault("do_predict", bool(raw.get("test_file")))
    raw.setdefault("do_eval", bool(raw.get("eval_file")))
    if not (raw["do_predict"] or raw["do_eval"]):
        raise ConfigError("sftlab predict: pass --test_file (generation) and/or --eval_file (loss, accuracy)")
    raw.pop("val_size", None)
    cfg = build_config(raw)
    run_sft(cfg)
    return 0


def cmd_chat(argv: list[str]) -> int:
    from sftlab.chat import chat_loop, load_for_chat

    model = _pop_opt(argv, "model")
    tools_file = _pop_opt(argv, "tools")
    if model:
        argv = ["--model_name_or_path", model, *argv]
    tools = read_tools_file(tools_file) if tools_file else None
    m, tok, template, cfg = load_for_chat(argv)

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


def cmd_export(argv: list[str]) -> int:
    from sftlab.config import parse_config
    from sftlab.models.load import adapter_base, load_model, load_tokenizer
    from sftlab.workflow import check_writable, resolve_template
    from sftlab.data.templates import save_template

    fmt = _pop_opt(argv, "format", "hf")
    if fmt == "gguf":
        return _export_gguf(argv)
    if fmt != "hf":
        raise ConfigError(f"--format: unknown '{fmt}'; choose hf (merged transformers directory) or gguf")
    model = _pop_opt(argv, "model")
    out = _pop_opt(argv, "out")
    if not model or not out:
        raise ConfigError("usage: sftlab export --model OUTPUT_DIR --out DIR")
    if not os.path.isdir(model) or adapter_base(model) is None:
        raise ConfigError(f"--model: {model} holds no LoRA adapter (adapter_config.json); nothing to merge")
    check_writable(out)
    cfg = parse_config(["--model_name_or_path", model, *argv])
    m, base = load_model(cfg.model, None, for_training=False, bf16=False)  # merged in fp32: exact
    tok = load_tokenizer(model)
    template = resolve_template(cfg, tok, model)
    m.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    save_template(template, out)
    print(f"merged {model} into {base} -> {out} (loads with transformers' AutoModelForCausalLM)")
    return 0


def _export_gguf(argv: list[str]) -> int:
    """Check everything, load (LoRA merged in fp32), write FILE.gguf and FILE.Modelfile beside it."""
    from sftlab.config import parse_config
    from sftlab.export.gguf import export_gguf, plan_export
    from sftlab.export.modelfile import write_modelfile
    from sftlab.export.chat_template import generation_prompt_tail
    from sftlab.models.load import load_model, load_tokenizer
    from sftlab.workflow import resolve_template

    model = _pop_opt(argv, "model")
    out = _pop_opt(argv, "out")
    quantization = _pop_opt(argv, "quantization", "f16")
    if not model or not out:
        raise ConfigError("usage: sftlab export --model OUTPUT_DIR --format gguf [--quantization f16] --out FILE.gguf")
    cfg = parse_config(["--model_name_or_path", model, *argv])
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


REPORT_USAGE = ("usage: sftlab data report [CONFIG.yaml] [--key value ...] [--out DIR] [--dedup] [--no_probe]\n"
                "  the config and flags of `sftlab train`; writes DIR/data_report.md, data_report.json and figures")


def cmd_data_report(argv: list[str]) -> int:
    from sftlab.config import parse_config
    from sftlab.report import data_report, write_report

    if "-h" in argv or "--help" in argv:
        print(REPORT_USAGE)
        return 0
    out = _pop_opt(argv, "out", "data_report")
    flags = {name: _pop_flag(argv, name) for name in ("dedup", "no_probe")}
    cfg = parse_config(argv)
    report = data_report(cfg, out_dir=out, dedup=flags["dedup"], probe=not flags["no_probe"],
                         log=lambda s: print(f"[sftlab] {s}", flush=True))
    paths = write_report(report, out)
    for line in report.summary_lines():
        print(line)
    print(f"report: {paths['markdown']} (every number in {paths['json']})")
    return 0


def _pop_flag(argv: list[str], name: str) -> bool:
    """Remove a bare --name (or --name true/false) from argv and return its value."""
    for i, a in enumerate(argv):
        if a == f"--{name}":
            value = argv[i + 1].lower() if i + 1 < len(argv) and argv[i + 1].lower() in ("true", "false") else None
            del argv[i:i + (2 if value else 1)]
            return value != "false"
    return False


def cmd_data(argv: list[str]) -> int:
    if argv and argv[0] == "report":
        return cmd_data_report(argv[1:])
    if not argv or argv[0] != "preview":
        raise ConfigError("usage: sftlab data preview [CONFIG.yaml] [--key value ...] [--n N] [--format text|json]\n"
                          "       " + REPORT_USAGE.split("\n")[0].removeprefix("usage: "))
    from sftlab.preview import preview

    argv = argv[1:]
    n = int(_pop_opt(argv, "n", "3"))
    fmt = _pop_opt(argv, "format", "text")
    if fmt not in ("text", "json"):
        raise ConfigError("--format: choose text or json")
    preview(argv, n=n, fmt=fmt, out=sys.stdout)
    return 0


def cmd_index(argv: list[str]) -> int:
    from sftlab.rqa.cli_index import main as index_main

    return index_main(argv)


def cmd_ui(argv: list[str]) -> int:
    """The local web app (sftlab.ui): runs, curves, new runs, compare, chat."""
    from sftlab.ui.app import serve

    if "-h" in argv or "--help" in argv:
        print("usage: sftlab ui [--workspace DIR] [--host 127.0.0.1] [--port 7860] [--token TOKEN] "
              "[--max_parallel_runs 1]\n  a host other than 127.0.0.1/localhost requires the access token "
              "(generated and printed unless given)")
        return 0
    workspace = _pop_opt(argv, "workspace", ".")
    host = _pop_opt(argv, "host", "127.0.0.1")
    port = _pop_opt(argv, "port", "7860")
    token = _pop_opt(argv, "token")
    parallel = _pop_opt(argv, "max_parallel_runs", "1")
    if argv:
        raise ConfigError(f"sftlab ui: unexpected argument(s) {' '.join(argv)}")
    if not port.isdigit() or not parallel.isdigit():
        raise ConfigError("sftlab ui: --port and --max_parallel_runs take whole numbers")
    serve(workspace, host=host, port=int(port), token=token, max_parallel=int(parallel))
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
    _quiet_libraries()
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
