"""End-to-end retrieval QA: retrieved passages for training rows, and the retrieve -> generate -> score evaluation.

Two jobs share one retriever (opened once per run by `open_rqa_retriever`, which builds the index on the main
process first when it is missing or stale):

* `rqa_context: retrieved` — `retrieval_rewrite` is the step (a `dataset.RowRewrite`) that gives each rqa row, in
  memory, the passages its prompt shows (`formats.CONTEXT_DOCS_KEY`): the gold passages plus the best-ranked other
  ones up to `retrieval_top_k`, in an order shuffled with the seed. Retrieval thus happens once, before
  tokenization, and nothing is written; the tokenized-data cache is keyed by the index (its manifest), k and the
  seed, so it never serves prompts retrieved from another index.
* End-to-end evaluation — `E2EEvaluator` retrieves the top-k passages of every question from the full collection,
  renders exactly the training prompt with them (`formats.rqa_messages` -> `tokenize.encode_prompt`), decodes
  greedily, and scores retrieval (recall@1, recall@k), answers (token F1 and ROUGE-L on the 0-100 scale of
  `predict_*`, cosine similarity of answer and gold embeddings) and latency. `E2ECallback` runs it at every
  evaluation during training (results go to trainer_log.jsonl as `e2e_*`); `run_e2e_test` runs it once on the
  test file at the end (e2e_eval_results.json, e2e_predictions.jsonl).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

from sftlab.config import training_amp
from sftlab.data import formats as F
from sftlab.data.dataset import RowRewrite
from sftlab.data.loader import Row
from sftlab.errors import ConfigError, DataError
from sftlab.files import atomic_writer
from sftlab.logs import log

RESULTS_FILE = "e2e_eval_results.json"
PREDICTIONS_FILE = "e2e_predictions.jsonl"
EVAL_PREDICTIONS_FILE = "e2e_eval_predictions.jsonl"  # the latest in-training evaluation


# ---- options and the retriever ----------------------------------------------------------------------------------
def check_rqa_options(cfg) -> None:
    """Retrieval options that can be checked before anything loads."""
    r = cfg.rqa
    if cfg.data.rqa_context == "retrieved" and not r.full_dataset_file_path:
        raise ConfigError("rqa_context=retrieved needs --full_dataset_file_path (the collection to retrieve from)")
    if r.retrieval_top_k < 1:
        raise ConfigError(f"retrieval_top_k: must be at least 1, got {r.retrieval_top_k}")
    if r.e2e_max_questions is not None and r.e2e_max_questions < 1:
        raise ConfigError(f"e2e_max_questions: must be at least 1, got {r.e2e_max_questions}")
    if r.full_dataset_file_path and not os.path.isfile(r.full_dataset_file_path):
        raise ConfigError(f"full_dataset_file_path: file not found: {r.full_dataset_file_path}")
    if r.full_dataset_file_path:
        # The end-to-end evaluations read these after training: a wrong file must fail now, not then.
        for files in (cfg.data.eval_file, cfg.data.test_file):
            if files:
                load_e2e_rows(files, cfg)


def index_dir_for(cfg) -> str:
    """--full_dataset_index_path, or <output_dir>/index when it is unset or empty."""
    return cfg.rqa.full_dataset_index_path or os.path.join(cfg.training.output_dir, "index")


def open_rqa_retriever(cfg, tokenizer=None):
    """Load the collection and reuse or build its index; the main process builds first, the others then reuse it.

    `tokenizer` measures chunks of raw (unchunked) documents, so chunk_size counts the generator's tokens.
    """
    from sftlab.rqa.index import open_retriever

    r = cfg.rqa
    index_dir = index_dir_for(cfg)
    with cfg.training.main_process_first(local=False, desc="rqa index"):
        retriever = open_retriever(r.full_dataset_file_path, index_dir, r.eval_embedding_model,
                                   refuse_stale=r.refuse_stale_index, tokenizer=tokenizer,
                                   chunk_size=r.chunk_size, chunk_overlap=r.chunk_overlap)
    r.full_dataset_index_path = index_dir  # the saved config then names the index that was used
    verb = "built" if retriever.built else "reused"
    log.info(f"[rqa] {verb} the index of {len(retriever.documents)} passages at {index_dir} "
             f"(embeddings: {retriever.embedder.model_id})")
    return retriever


def _doc_dict(doc) -> dict:
    return doc.to_dict() if hasattr(doc, "to_dict") else dict(doc)


# ---- rqa_context: retrieved -------------------------------------------------------------------------------------
def _row_rng(seed: int, row: Row, question: str) -> random.Random:
    """A generator per row, so a row's passage order depends on the seed and the row, not on processing order."""
    digest = hashlib.sha256(f"{seed}\0{row.line}\0{question}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def context_passages(gold: Sequence[dict], ranked: Sequence[Any], k: int, rng: random.Random) -> list[dict]:
    """The passages of a training prompt: every gold passage plus the best-ranked others, k in all, shuffled.

    Gold passages keep the row's own records (so their text is exactly what gold mode shows); a retrieved
    passage that is a gold one is not repeated. More gold passages than k are all kept.
    """
    from sftlab.rqa.metrics import same_document

    passages = [dict(g) for g in gold]
    for doc in ranked:
        if len(passages) >= k:
            break
        if not any(same_document(doc, p) for p in passages):
            passages.append(_doc_dict(doc))
    rng.shuffle(passages)
    return passages


def _rqa_rows(path: str, cfg) -> tuple[str, list[Row]]:
    from sftlab.data.dataset import load_rows

    d = cfg.data
    pairs = load_rows([path], d.dataset_format, d.column_mapping, d.max_samples)
    return pairs[0][0], [row for _, row in pairs]


def retrieval_rewrite(cfg, retriever) -> RowRewrite:
    """The retrieval step of ``rqa_context: retrieved`` for `dataset.tokenize_files` / `prediction_items`: rqa rows
    get their prompt passages in memory (`with_retrieved_passages`); rows of other formats pass unchanged."""
    from sftlab.data.splits import encode_settings

    opts = encode_settings(cfg).options
    k, seed = cfg.rqa.retrieval_top_k, cfg.training.seed
    log.info(f"rqa_context=retrieved: each prompt shows its gold passages and the top-{k} retrieved ones, "
             f"shuffled with seed {seed}")
    key = {"step": "rqa_context=retrieved", "version": 1, "k": k, "seed": seed,
           "index": {name: retriever.manifest.get(name) for name in INDEX_IDENTITY}}
    return RowRewrite(lambda pairs, split: with_retrieved_passages(pairs, retriever, k, seed, opts), key)


# What makes one index's search results differ from another's (its manifest; not when or by which version it was
# built): the tokenized-data cache of rqa_context=retrieved is keyed by these.
INDEX_IDENTITY = ("format", "format_version", "embedding_model", "documents_hash", "dimension", "count", "metric")


def with_retrieved_passages(pairs: list[tuple[str, Row]], retriever, k: int, seed: int,
                            opts: F.FormatOptions) -> list[tuple[str, Row]]:
    """The (format, row) pairs, each rqa row with its k prompt passages (`context_passages`) under
    `formats.CONTEXT_DOCS_KEY`; one search call for the chunk. Rows are validated first, naming file and line."""
    at = [i for i, (fmt, _) in enumerate(pairs) if fmt == "rqa"]
    rows = [pairs[i][1] for i in at]
    for row in rows:
        F.to_messages("rqa", row, opts)  # validates the row, naming its file and line
    golds = [row.data.get("gold_docs") or [] for row in rows]
    # Extra candidates so that k non-gold passages remain after the gold ones are set aside.
    depth = k + max((len(g) for g in golds), default=0)
    hits = retriever.search([str(row.data["question"]) for row in rows], depth) if rows else []
    out = list(pairs)
    for i, row, gold, found in zip(at, rows, golds, hits):
        rng = _row_rng(seed, row, str(row.data["question"]))
        passages = context_passages(gold, [doc for doc, _ in found], k, rng)
        out[i] = ("rqa", Row({**row.data, F.CONTEXT_DOCS_KEY: passages}, row.file, row.line))
    return out


# ---- end-to-end evaluation --------------------------------------------------------------------------------------
def load_e2e_rows(files: Sequence[str], cfg) -> list[Row]:
    """The rqa rows of `files` (max_samples applies per file); a non-rqa file is a DataError."""
    rows: list[Row] = []
    for path in files:
        fmt, file_rows = _rqa_rows(path, cfg)
        if fmt != "rqa":
            raise DataError(f"end-to-end retrieval evaluation needs rqa rows (question, gold_answer, gold_docs); "
                            f"this file is '{fmt}'", file=path)
        for row in file_rows:
            F.to_messages("rqa", row, F.FormatOptions())  # validates, naming file and line
        rows += file_rows
    return rows


def e2e_prompt_ids(tokenizer, template, row: dict, passages: Sequence[Any], cutoff_len: int,
                   system: str | None = None) -> list[int]:
    """The generation prompt for a question with these passages: the training prompt up to the answer.

    Like training, a prompt over cutoff_len loses its oldest chat history first, then is cut from the left.
    """
    from sftlab.data.tokenize import fit_prompt

    history = row.get("chat_history") or []

    def messages_without(n: int):
        if n > len(history):
            return None
        msgs = F.rqa_messages(row, passages=list(passages), system=system, drop_history=n)
        return msgs[:-1] if msgs[-1].role == "assistant" else msgs

    return fit_prompt(tokenizer, template, messages_without, cutoff_len)[0]


@dataclass
class E2EResult:
    metrics: dict[str, float]
    predictions: list[dict]


class E2EEvaluator:
    """Retrieve, prompt, generate and score a list of rqa rows with one model (see the module docstring)."""

    def __init__(self, cfg, tokenizer, template, retriever):
        from sftlab.data.tokenize import multi_token_stop_strings, stop_token_ids
        from sftlab.data.splits import encode_settings

        self.cfg, self.tokenizer, self.template, self.retriever = cfg, tokenizer, template, retriever
        self.k = cfg.rqa.retrieval_top_k
        self.system = encode_settings(cfg).options.system
        # LocalRQA sampled at temperature 0.7; greedy decoding makes evaluations comparable across runs.
        self.gen_args = dataclasses.replace(cfg.generating, do_sample=False)
        self.stop_ids = stop_token_ids(tokenizer, template)
        self.stop_strings = multi_token_stop_strings(tokenizer, template)
        t = cfg.training
        self.batch_size = cfg.generating.generation_batch_size or t.per_device_eval_batch_size

    def evaluate(self, model, rows: Sequence[Row]) -> E2EResult:
        from sftlab.eval.generate import generate_batched
        from sftlab.eval.metrics import text_metrics, token_f1
        from sftlab.rqa.metrics import embedding_similarity, retrieval_recall, same_document

        if not rows:
            raise DataError("end-to-end evaluation: no questions")
        model = getattr(model, "module", model)
        data = [r.data for r in rows]
        start = time.perf_counter()
        hits = self.retriever.search([str(d["question"]) for d in data], self.k)
        retrieved = [[_doc_dict(doc) for doc, _ in found] for found in hits]
        prompts = [e2e_prompt_ids(self.tokenizer, self.template, d, docs, self.cfg.data.cutoff_len, self.system)
                   for d, docs in zip(data, retrieved)]
        gen = generate_batched(model, self.tokenizer, prompts, self.gen_args, self.stop_ids, self.batch_size,
                               stop_strings=self.stop_strings, amp=training_amp(self.cfg.training))
        latency = (time.perf_counter() - start) / len(rows)

        answers = gen.texts
        golds = [str(d["gold_answer"]) for d in data]
        gold_docs = [d.get("gold_docs") or [] for d in data]
        text = text_metrics(answers, golds)
        metrics: dict[str, float] = {"e2e_recall@1": retrieval_recall(retrieved, gold_docs, 1)}
        metrics[f"e2e_recall@{self.k}"] = retrieval_recall(retrieved, gold_docs, self.k)
        metrics.update({
            "e2e_f1": text["f1"],
            "e2e_rouge-l": text["rouge-l"],
            "e2e_embedding_similarity": embedding_similarity(self.retriever.embedder, answers, golds),
            "e2e_latency_s": latency,
            "e2e_questions": len(rows),
        })
        predictions = []
        for d, docs, gdocs, answer, gold in zip(data, retrieved, gold_docs, answers, golds):
            predictions.append({
                "question": d["question"],
                "chat_history": d.get("chat_history") or [],
                "retrieved_sources": [(doc.get("metadata") or {}).get("source") for doc in docs],
                "gold_sources": [(g.get("metadata") or {}).get("source") for g in gdocs],
                "gold_retrieved": any(same_document(r, g) for r in docs for g in gdocs),
                "gold_answer": gold,
                "generated_answer": answer,
                "f1": round(100.0 * token_f1(answer, gold), 2),
            })
        return E2EResult(metrics, predictions)


def write_jsonl(path: str | Path, records: Sequence[dict]) -> None:
    """JSON lines (UTF-8, unescaped), written to a temporary file and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as fh:
        for rec in records:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")


def format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k[4:]} {v:.4g}" if isinstance(v, float) else f"{k[4:]} {v}" for k, v in metrics.items())


class E2ECallback(TrainerCallback):
    """At every evaluation (rank 0 only): end-to-end evaluation of the eval questions, logged as `e2e_*`."""

    def __init__(self, trainer, evaluator: E2EEvaluator, rows: list[Row], output_dir: str):
        self.trainer, self.evaluator, self.rows, self.output_dir = trainer, evaluator, rows, output_dir

    def on_evaluate(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        result = self.evaluator.evaluate(self.trainer.model, self.rows)
        write_jsonl(os.path.join(self.output_dir, EVAL_PREDICTIONS_FILE),
                    [{"step": state.global_step, **p} for p in result.predictions])
        # Through Trainer.log: LogCallback writes the trainer_log.jsonl record and state.log_history keeps it.
        self.trainer.log(dict(result.metrics))


def attach_e2e_callback(trainer, cfg, tokenizer, template, retriever=None) -> E2ECallback:
    """Add the in-training end-to-end evaluation on the eval file (capped at e2e_max_questions) to `trainer`."""
    if retriever is None:
        retriever = open_rqa_retriever(cfg, tokenizer)
    rows = load_e2e_rows(cfg.data.eval_file, cfg)
    if cfg.rqa.e2e_max_questions:
        rows = rows[: cfg.rqa.e2e_max_questions]
    callback = E2ECallback(trainer, E2EEvaluator(cfg, tokenizer, template, retriever), rows,
                           cfg.training.output_dir)
    trainer.add_callback(callback)
    log.info(f"[rqa] end-to-end evaluation of {len(rows)} eval questions at every evaluation "
             f"(top-{cfg.rqa.retrieval_top_k} passages, greedy decoding)")
    return callback


def run_e2e_test(trainer, cfg, tokenizer, template, retriever) -> dict[str, float]:
    """The final end-to-end evaluation on every test question: e2e_eval_results.json and e2e_predictions.jsonl."""
    if not trainer.is_world_process_zero():
        return {}
    from sftlab.outputs import write_json

    rows = load_e2e_rows(cfg.data.test_file, cfg)
    result = E2EEvaluator(cfg, tokenizer, template, retriever).evaluate(trainer.model, rows)
    out = cfg.training.output_dir
    write_json(os.path.join(out, RESULTS_FILE), result.metrics)
    write_jsonl(os.path.join(out, PREDICTIONS_FILE), result.predictions)
    log.info(f"[rqa] end-to-end on {len(rows)} test questions: {format_metrics(result.metrics)}")
    return result.metrics
