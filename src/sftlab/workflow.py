"""The SFT workflow (LLaMA-Factory's run_sft, top to bottom): check, tokenizer, template, data, model, train,
evaluate, predict, then results, plot and model card. `sftlab train` and `sftlab predict` both run it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftlab.config import Config, save_config, training_amp
from sftlab.data.dataset import RowRewrite, prediction_items
from sftlab.data.splits import ListDataset, Splits, build_splits, encode_settings
from sftlab.data.templates import Template, resolve_template, save_template
from sftlab.data.tokenize import check_template_tokens, multi_token_stop_strings, stop_token_ids
from sftlab.errors import ConfigError
from sftlab.logs import log, quiet_third_party
from sftlab.train.checkpoint import find_resume_checkpoint
from sftlab.outputs import plot_loss, write_json, write_model_card


# ---- checks before anything heavy -----------------------------------------------------------------------------
def preflight(cfg: Config) -> None:
    """Everything that can be known without the model, so mistakes fail in the first seconds."""
    t, d = cfg.training, cfg.data
    if not (t.do_train or t.do_eval or t.do_predict):
        raise ConfigError("nothing to do: give --train_file (or --do_eval/--do_predict with their files)")
    for name in ("train_file", "eval_file", "test_file"):
        for f in getattr(d, name, None) or []:
            if not os.path.exists(f) and not (f.count("/") == 1 and not Path(f).suffix):
                raise ConfigError(f"{name}: file not found: {f}")
    if t.do_train and not d.train_file:
        raise ConfigError("do_train: no training data; pass --train_file")
    if t.do_predict and not d.test_file:
        raise ConfigError("do_predict: no prediction data; pass --test_file")
    if d.val_size and d.eval_file:
        raise ConfigError("val_size and eval_file both given: choose one source of evaluation data")
    if cfg.rqa.full_dataset_file_path or d.rqa_context == "retrieved":
        from sftlab.rqa.e2e import check_rqa_options

        check_rqa_options(cfg)
    if t.load_best_model_at_end and not (d.eval_file or d.val_size):
        raise ConfigError("load_best_model_at_end needs evaluation data (--eval_file or --val_size)")
    if getattr(t.eval_strategy, "value", t.eval_strategy) != "no" and not (d.eval_file or d.val_size):
        raise ConfigError(f"eval_strategy={t.eval_strategy.value}: no evaluation data (--eval_file or --val_size)")
    check_writable(t.output_dir)


def check_writable(output_dir: str) -> None:
    p = Path(output_dir)
    try:
        p.mkdir(parents=True, exist_ok=True)
        # One probe per process: the ranks of a distributed run check the same directory at the same moment.
        probe = p / f".sftlab-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"output_dir: cannot write to {output_dir}: {e.strerror or e}") from None


# ---- pieces ---------------------------------------------------------------------------------------------------
def speed_up_for_cpu(model, cfg: Config):
    """sftlab.accel's speed paths on CPU (same results); returns the batch hook for the trainer, or None."""
    if cfg.training.device.type != "cpu":
        return None
    from sftlab.accel import AccelOptions, apply

    options = AccelOptions(
        pad_tokens_to_multiple_of=cfg.finetuning.pad_tokens_to_multiple_of,
        # LoRA only: freeze saves the whole model, and its frozen layers must be written back exactly as loaded.
        store_frozen_in_bf16=cfg.training.bf16 and cfg.finetuning.finetuning_type == "lora",
    )
    applied = apply(model, options)
    for line in applied.changes:
        log.debug(line)
    return applied.batch_hook


# ---- the workflow: setup -> fit -> evaluate -> predict -> write outputs -----------------------------------
@dataclass
class Run:
    """What `setup` prepares for the verbs that follow."""

    cfg: Config
    tokenizer: Any
    template: Template
    data: Splits
    trainer: Any
    base_path: str | None = None
    retriever: Any = None
    rewrite: RowRewrite | None = None
    predict_items: list | None = None
    resume: str | None = None
    started: float = field(default_factory=time.time)


def run_sft(cfg: Config, callbacks: list | None = None) -> dict[str, Any]:
    """Train / evaluate / predict as selected by do_train, do_eval, do_predict; returns all metrics."""
    run = setup(cfg, callbacks)
    t = cfg.training
    metrics: dict[str, Any] = {}
    if t.do_train:
        metrics.update(fit(run))
    if t.do_eval and run.trainer.eval_dataset is not None:
        metrics.update(evaluate(run))
    if t.do_predict and run.predict_items:
        metrics.update(predict(run))
    if run.retriever is not None and cfg.data.test_file:
        from sftlab.rqa.e2e import run_e2e_test

        metrics.update(run_e2e_test(run.trainer, cfg, run.tokenizer, run.template, run.retriever))
    write_outputs(run, metrics)
    return metrics


def setup(cfg: Config, callbacks: list | None = None) -> Run:
    """Checks, tokenizer and template, data, model and trainer: everything before the first step."""
    from transformers import set_seed

    from sftlab.models.load import count_parameters, load_model

    preflight(cfg)
    quiet_third_party()
    t = cfg.training
    tokenizer, template = load_tokenizer_and_template(cfg)
    retriever = open_retriever(cfg, tokenizer)
    rewrite = retrieval_step(cfg, retriever)
    data = build_splits(cfg, tokenizer, template, rewrite)
    predict_items = load_prediction_items(cfg, tokenizer, template, rewrite) if t.do_predict else None
    resume = find_resume_checkpoint(t.output_dir, t.resume_from_checkpoint, cfg.finetuning.overwrite_output_dir
                                    or getattr(t, "overwrite_output_dir", False)) if t.do_train else None
    if t.do_train and data.train is not None and not cfg.data.streaming:  # a stream's size is not known ahead
        from sftlab.report import ensure_run_estimate

        ensure_run_estimate(cfg, data.train)  # what the model card compares this run with
    set_seed(t.seed)  # LoRA initialisation draws random numbers: the same --seed must give the same adapter
    if t.device.type == "cpu":
        from sftlab.train.distributed import init_deepspeed_comm

        init_deepspeed_comm(t)  # ZeRO-3 partitions while loading (accelerate starts DeepSpeed's comm on GPUs only)
    model, base_path = load_model(cfg.model, cfg.finetuning, for_training=t.do_train)
    if t.do_train:
        trainable, total = count_parameters(model)
        log.info(f"model {cfg.model.model_name_or_path} ({total / 1e6:.1f}M parameters, "
                 f"{trainable / 1e6:.2f}M trainable, {cfg.finetuning.finetuning_type}); "
                 f"bf16 autocast {'on' if t.bf16 else 'off'}")
    trainer = build_trainer(cfg, model, tokenizer, template, data, callbacks)
    if cfg.rqa.full_dataset_file_path and t.do_train and cfg.data.eval_file is not None:
        from sftlab.rqa.e2e import attach_e2e_callback

        attach_e2e_callback(trainer, cfg, tokenizer, template, retriever)
    if trainer.is_world_process_zero():
        save_run_files(cfg, template, t.output_dir)
    return Run(cfg=cfg, tokenizer=tokenizer, template=template, data=data, trainer=trainer, base_path=base_path,
               retriever=retriever, rewrite=rewrite, predict_items=predict_items, resume=resume)


def load_tokenizer_and_template(cfg: Config):
    from sftlab.models.load import load_tokenizer, resolve_model_path

    model_path = resolve_model_path(cfg.model.model_name_or_path, cfg.model.cache_dir)
    tokenizer = load_tokenizer(model_path)
    template = resolve_template(cfg, tokenizer, model_path)
    check_template_tokens(tokenizer, template)
    log.debug(f"template '{template.name}', train_on={cfg.data.train_on}, cutoff_len={cfg.data.cutoff_len}; "
              f"{template.describe_tools()}")
    return tokenizer, template


def open_retriever(cfg: Config, tokenizer):
    if not cfg.rqa.full_dataset_file_path:
        return None
    from sftlab.rqa.e2e import open_rqa_retriever

    return open_rqa_retriever(cfg, tokenizer)


def retrieval_step(cfg: Config, retriever) -> RowRewrite | None:
    """With ``rqa_context: retrieved``, the step that gives each row its retrieved passages (in memory)."""
    if cfg.data.rqa_context != "retrieved":
        return None
    from sftlab.rqa.e2e import retrieval_rewrite

    return retrieval_rewrite(cfg, retriever)


def load_prediction_items(cfg: Config, tokenizer, template: Template, rewrite: RowRewrite | None = None) -> list:
    items = prediction_items(cfg.data.test_file, tokenizer, template, encode_settings(cfg), cfg.data.max_samples,
                             rewrite)
    log.info(f"[test] {len(items)} prompts for prediction")
    return items


def save_run_files(cfg: Config, template: Template, directory: str) -> None:
    """The resolved configuration and the template: saved in output_dir and beside every checkpoint."""
    save_template(template, directory)
    save_config(cfg, os.path.join(directory, "sftlab_config.yaml"))


def build_trainer(cfg: Config, model, tokenizer, template: Template, data: Splits, callbacks: list | None):
    from sftlab.data.collator import SFTCollator, mask_mode_for_attention
    from sftlab.train.callbacks import GracefulStop
    from sftlab.train.trainer import CountingCollator, SFTTrainer

    t = cfg.training
    batch_hook = speed_up_for_cpu(model, cfg) if t.do_train else None
    mask_mode = mask_mode_for_attention(model.config._attn_implementation)
    if mask_mode == "auto" and not cfg.data.packing and "train_sampling_strategy" not in cfg.explicit:
        # Padded batches (no varlen attention): grouping examples of similar length cuts the padding of batch-8
        # steps from 48% to 6% on benchmarks/throughput.py's data. Padding-free batches have nothing to save.
        t.train_sampling_strategy = "group_by_length"
    collator = CountingCollator(SFTCollator(pad_token_id=tokenizer.pad_token_id, mask_mode=mask_mode))
    streamed = cfg.data.streaming and data.train is not None
    if streamed:
        t.ignore_data_skip = True  # the stream resumes at its recorded position; Trainer must not replay batches
    trainer = SFTTrainer(
        model=model, args=t, data_collator=collator, processing_class=tokenizer,
        train_dataset=data.train if streamed else ListDataset(data.train) if data.train is not None else None,
        eval_dataset=ListDataset(data.eval) if data.eval is not None else None,
        callbacks=[GracefulStop(), *(callbacks or [])],
        loss_chunk_size=cfg.finetuning.loss_chunk_size, compute_accuracy=cfg.finetuning.compute_accuracy,
        max_tokens_per_forward=cfg.finetuning.max_tokens_per_forward, batch_hook=batch_hook,
        save_beside_checkpoint=lambda directory: save_run_files(cfg, template, directory),
    )
    if streamed:
        from sftlab.data.streaming import StreamTracker

        trainer.stream_tracker = StreamTracker(data.train)
    wants_fsdp = bool(t.fsdp) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if wants_fsdp and not getattr(trainer, "is_fsdp_enabled", False):
        # accelerate enables FSDP for GPU (and other accelerator) backends only; elsewhere it silently trains DDP.
        log.info("FSDP was requested but is not active on this device (accelerate enables it on GPUs only); "
                 "training runs as plain data parallelism (DDP)")
    return trainer


def fit(run: Run) -> dict[str, Any]:
    """Train (resuming where a checkpoint says), save the final model; train metrics with token rates."""
    from sftlab.train.checkpoint import save_final_model
    from sftlab.train.trainer import peak_rss_bytes

    trainer, t = run.trainer, run.cfg.training
    if run.resume:
        log.info(f"resuming from {run.resume} (pass --overwrite_output_dir true to start over)")
        if trainer.stream_tracker is not None and not trainer.stream_tracker.restore(run.resume, t.process_index):
            raise ConfigError(f"{run.resume} holds no stream position (it was not saved by a streaming run): "
                              "resume it with streaming: false, or start over with --overwrite_output_dir true")
    result = trainer.train(resume_from_checkpoint=run.resume)
    if trainer.stream_tracker is not None:  # what the workers read, now that it is known
        streamed = trainer.stream_tracker.summary()
        run.data.summaries.insert(0, streamed)
        log.info(streamed.line())
    save_final_model(trainer)  # adapter only for LoRA; a full disk is reported, not a traceback
    tokens, trained = trainer.global_token_counts()
    runtime = result.metrics.get("train_runtime", time.time() - run.started)
    metrics = dict(result.metrics)
    metrics.update(
        train_peak_rss_mb=round(peak_rss_bytes() / 2**20, 1),
        train_tokens=tokens, train_trained_tokens=trained,
        train_tokens_per_second=round(tokens / max(runtime, 1e-9), 2),
        train_target_tokens_per_second=round(trained / max(runtime, 1e-9), 2),
    )
    if trainer.is_world_process_zero():
        run.tokenizer.save_pretrained(t.output_dir)  # the template was saved before training
        write_json(os.path.join(t.output_dir, "train_results.json"), metrics)
        trainer.state.save_to_json(os.path.join(t.output_dir, "trainer_state.json"))
    log.info(f"train_loss {metrics.get('train_loss', float('nan')):.4f}, "
             f"{metrics['train_tokens_per_second']:.1f} tokens/s "
             f"({metrics['train_target_tokens_per_second']:.1f} trained tokens/s)")
    return metrics


def evaluate(run: Run) -> dict[str, Any]:
    """Loss, perplexity and accuracy over the eval set; with predict_with_generate also ROUGE/BLEU/EM/F1."""
    cfg, trainer = run.cfg, run.trainer
    metrics = trainer.evaluate()
    if cfg.training.predict_with_generate and cfg.data.eval_file:
        # Generative evaluation, as LLaMA-Factory's predict_with_generate: ROUGE/BLEU/EM/F1 on the eval rows.
        items = prediction_items(cfg.data.eval_file, run.tokenizer, run.template, encode_settings(cfg),
                                 cfg.data.max_samples, run.rewrite, split="eval")
        metrics.update(run_predict(cfg, trainer.model, run.tokenizer, run.template, items, trainer,
                                   prefix="eval", write_results=False))
    if trainer.is_world_process_zero():
        write_json(os.path.join(cfg.training.output_dir, "eval_results.json"), metrics)
    log.info("eval: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics


def predict(run: Run) -> dict[str, Any]:
    return run_predict(run.cfg, run.trainer.model, run.tokenizer, run.template, run.predict_items, run.trainer)


def write_outputs(run: Run, metrics: dict[str, Any]) -> None:
    """After training: the loss plot, the model card and all_results.json (main process)."""
    cfg, t = run.cfg, run.cfg.training
    if not (t.do_train and run.trainer.is_world_process_zero()):
        return
    if cfg.finetuning.plot_loss:
        plot_loss(t.output_dir)
    write_model_card(t.output_dir, cfg, run.base_path, run.template.name, metrics,
                     [s.line() for s in run.data.summaries])
    write_json(os.path.join(t.output_dir, "all_results.json"), metrics)


def run_predict(cfg: Config, model, tokenizer, template: Template, items, trainer=None, prefix: str = "predict",
                write_results: bool = True) -> dict[str, Any]:
    """Batched greedy generation over prompts; generated_predictions.jsonl (eval_predictions.jsonl for the eval
    phase) and predict_results.json with ROUGE-1/2/L, BLEU-4, exact match and F1 (0-100) and generation speed."""

    from sftlab.eval.generate import generate_batched, write_predictions
    from sftlab.data.tools import call_dicts, parse_tool_calls, without_reasoning
    from sftlab.eval.metrics import text_metrics, tool_call_metrics

    t = cfg.training
    if trainer is not None and not trainer.is_world_process_zero():
        return {}
    gen = cfg.generating
    model = getattr(model, "module", model)
    bs = gen.generation_batch_size or t.per_device_eval_batch_size
    result = generate_batched(model, tokenizer, [it.prompt_ids for it in items], gen,
                              stop_token_ids(tokenizer, template), batch_size=bs,
                              stop_strings=multi_token_stop_strings(tokenizer, template),
                              amp=training_amp(t))
    preds = result.texts
    labels = [it.label for it in items]
    name = "generated_predictions.jsonl" if prefix == "predict" else f"{prefix}_predictions.jsonl"
    answers = [without_reasoning(p) for p in preds]  # labels hold answers; a think block is not scored
    calls = [parse_tool_calls(a) for a in answers]
    calls = [call_dicts(c) if c else None for c in calls]
    write_predictions(os.path.join(t.output_dir, name), [it.prompt for it in items], preds, labels,
                      [{"tool_calls": c} if c else {} for c in calls])
    scores = {f"{prefix}_{k}": v for k, v in text_metrics(answers, labels).items()}
    scores.update({f"{prefix}_{k}": v for k, v in tool_call_metrics(calls, [it.label_calls for it in items]).items()})
    scores[f"{prefix}_generation_tokens_per_second"] = round(result.tokens_per_second, 2)
    scores[f"{prefix}_new_tokens"] = result.new_tokens
    scores[f"{prefix}_generation_runtime"] = round(result.seconds, 3)
    scores[f"{prefix}_samples"] = len(items)
    if write_results:
        write_json(os.path.join(t.output_dir, f"{prefix}_results.json"), scores)
    if write_results:  # the eval phase prints its generation scores with the rest of its metrics
        log.info(f"{prefix}: " + ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float)))
    return scores

