"""End-to-end retrieval QA (sftlab.rqa.e2e): the evaluation prompt is the training prompt, rqa_context=retrieved,
the evaluator's scores against independent recomputations, and LocalRQA's command line through `sftlab train`."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from sftlab.config import DataArguments, parse_config
from sftlab.data import formats as F
from sftlab.data.dataset import EncodeSettings, RowRewrite, encode_row, tokenize_files
from sftlab.data.loader import Row, read_rows
from sftlab.data.templates import load_template
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.rqa import e2e
from sftlab.rqa.documents import load_documents
from sftlab.rqa.metrics import same_document
from sftlab.workflow import retrieval_step

EX = Path(__file__).resolve().parents[2] / "examples" / "rqa"
TRAIN, EVAL, TEST = (str(EX / f"{s}_w_qa.jsonl") for s in ("train", "eval", "test"))
DOCS_JSONL, DOCS_PKL = str(EX / "documents.jsonl"), str(EX / "documents.pkl")
LOCALRQA_PREFIXES = dict(user_prefix="<s>[INST]", assistant_prefix="[/INST]", sep_user=" ", sep_sys="</s>")


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _settings(cutoff_len: int = 4096) -> EncodeSettings:
    return EncodeSettings(train_on="completion", cutoff_len=cutoff_len, truncation="keep_answer",
                          dataset_format=None, column_mapping={}, options=F.FormatOptions())


def _first_trained(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


_PASSAGE_VECS: dict[int, np.ndarray] = {}


def _independent_ranking(embedder, question: str, docs) -> list[int]:
    """Passage indices by cosine similarity to the question, computed with numpy instead of FAISS."""
    key = id(embedder)
    if key not in _PASSAGE_VECS:
        _PASSAGE_VECS[key] = embedder.embed_passages([d.page_content for d in docs])
    q = embedder.embed_queries([question])[0]
    return [int(i) for i in np.argsort(-(_PASSAGE_VECS[key] @ q), kind="stable")]


# ---- the evaluation prompt is the training prompt -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["chat_template", "localrqa_prefix"])
def test_e2e_prompt_equals_training_prompt_up_to_the_answer(kind, smol_tokenizer, sp_tokenizer):
    if kind == "chat_template":
        tokenizer, template = smol_tokenizer, load_template(None, smol_tokenizer)
    else:
        tokenizer = sp_tokenizer
        template = load_template(None, sp_tokenizer, data_args=DataArguments(**LOCALRQA_PREFIXES))
    docs = [d.to_dict() for d in load_documents(DOCS_JSONL)]
    rows = _jsonl(TRAIN)
    chosen = [r for r in rows if r["chat_history"]][:3] + [r for r in rows if not r["chat_history"]][:3]
    assert len(chosen) == 6
    for n, row in enumerate(chosen):
        passages = [docs[(7 * n + j) % len(docs)] for j in range(4)]
        # Training side: a row prepared for rqa_context=retrieved, encoded exactly as tokenize_files does.
        enc, why = encode_row("rqa", Row({**row, F.CONTEXT_DOCS_KEY: passages}, "t.jsonl", n + 1),
                              tokenizer, template, _settings())
        assert why is None and not enc.truncated
        prompt = e2e.e2e_prompt_ids(tokenizer, template, row, passages, cutoff_len=4096)
        assert prompt == enc.input_ids[: _first_trained(enc.labels)]
        text = tokenizer.decode(prompt)
        positions = [text.index(p["page_content"]) for p in passages]
        assert positions == sorted(positions)  # every passage is shown, in the given order
        assert text.rindex(row["question"]) > positions[-1]  # the question comes after the passages
        # Gold mode: the gold passages at evaluation give the gold-context training prompt.
        gold_enc, _ = encode_row("rqa", Row(row, "t.jsonl", n + 1), tokenizer, template, _settings())
        gold_prompt = e2e.e2e_prompt_ids(tokenizer, template, row, row["gold_docs"], cutoff_len=4096)
        assert gold_prompt == gold_enc.input_ids[: _first_trained(gold_enc.labels)]
        assert gold_prompt != prompt


# ---- rqa_context: retrieved ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def retriever(minilm, tmp_path_factory):
    from sftlab.rqa.index import load_or_build_index

    return load_or_build_index(load_documents(DOCS_JSONL), minilm, tmp_path_factory.mktemp("rqa") / "index")


def _cfg(tmp_path, *flags: str):
    return parse_config(["--output_dir", str(tmp_path / "out"), "--data_cache_dir", str(tmp_path / "cache"),
                         "--full_dataset_file_path", DOCS_JSONL, *flags])


def test_retrieved_context_has_gold_top_ranked_others_and_seeded_order(tmp_path, retriever, minilm, smol_tokenizer):
    docs = load_documents(DOCS_JSONL)
    rows = _jsonl(TRAIN)[:12]
    # A row whose gold passage does not answer its question: retrieval will not find it, it must still be there.
    palm = next(d for d in docs if d.title == "spindle palm")
    odd = {"question": "What currency is used in the Marrowind Archipelago?", "chat_history": [],
           "gold_docs": [palm.to_dict()], "gold_answer": "Nobody knows."}
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n" + json.dumps(odd) + "\n")
    k = 3

    def prepare(seed: int) -> tuple[RowRewrite, list[Row]]:
        cfg = _cfg(tmp_path, "--train_file", str(data), "--rqa_context", "retrieved", "--retrieval_top_k", str(k),
                   "--seed", str(seed))
        rewrite = retrieval_step(cfg, retriever)
        pairs = [("rqa", row) for row in read_rows(str(data))]
        return rewrite, [row for _, row in rewrite.apply(pairs, "train")]

    rewrite7, out7 = prepare(7)
    assert [(r.file, r.line) for r in out7] == [(str(data), r.line) for r in read_rows(str(data))]  # errors name them
    assert _independent_ranking(minilm, odd["question"], docs).index(docs.index(palm)) >= k
    for row in out7:
        passages = row.data[F.CONTEXT_DOCS_KEY]
        gold = row.data["gold_docs"]
        assert len(passages) == k
        assert all(any(same_document(p, g) for p in passages) for g in gold)
        assert all(not same_document(a, b) for i, a in enumerate(passages) for b in passages[i + 1:])
        ranking = _independent_ranking(minilm, row.data["question"], docs)
        others = [docs[i].page_content for i in ranking if not any(same_document(docs[i], g) for g in gold)]
        shown = {p["page_content"] for p in passages if not any(same_document(p, g) for g in gold)}
        assert shown == set(others[: k - len(gold)])

    _, again = prepare(7)
    assert [r.data for r in again] == [r.data for r in out7]  # same seed, same passages in the same order
    rewrite8, out8 = prepare(8)
    orders7 = [[p["page_content"] for p in r.data[F.CONTEXT_DOCS_KEY]] for r in out7]
    orders8 = [[p["page_content"] for p in r.data[F.CONTEXT_DOCS_KEY]] for r in out8]
    assert all(sorted(a) == sorted(b) for a, b in zip(orders7, orders8))
    assert orders7 != orders8  # another seed shuffles differently

    # The tokenized-data cache keys on the step: each seed gets its own prompts, in its own order.
    template = load_template(None, smol_tokenizer)
    cache = str(tmp_path / "cache")
    ex8, _ = tokenize_files([str(data)], "train", smol_tokenizer, template, _settings(), cache_dir=cache,
                            rewrite=rewrite8)
    ex7, _ = tokenize_files([str(data)], "train", smol_tokenizer, template, _settings(), cache_dir=cache,
                            rewrite=rewrite7)
    assert ex7 != ex8
    for ex, order in zip(ex7, orders7):
        text = smol_tokenizer.decode(ex["input_ids"])
        positions = [text.index(p) for p in order]
        assert positions == sorted(positions)


def _seeded_order(seed: int, line: int, question: str, passages: list[dict]) -> list[dict]:
    """The documented passage order of rqa_context=retrieved: shuffled by a generator seeded from sha256 of the
    seed, the row's line and its question."""
    digest = hashlib.sha256(f"{seed}\0{line}\0{question}".encode()).digest()
    shuffled = list(passages)
    random.Random(int.from_bytes(digest[:8], "big")).shuffle(shuffled)
    return shuffled


def test_retrieved_context_is_added_in_memory_with_the_tokens_of_the_rewritten_file(
        tmp_path, retriever, minilm, smol_tokenizer):
    """The retrieval step writes nothing: the tokens (training, eval and prediction prompts) are those of data files
    that carry the expected passages, built here independently (numpy ranking, documented seeded order) and
    tokenized without any retrieval, as the former file-based step did."""
    from sftlab.data.dataset import prediction_items
    from sftlab.data.splits import build_splits, encode_settings

    docs = load_documents(DOCS_JSONL)
    k, seed = 3, 5
    written: dict[str, Path] = {}
    for name, source, n in (("train", TRAIN, 6), ("eval", EVAL, 3), ("test", TEST, 3)):
        every = _jsonl(source)
        rows = ([r for r in every if r["chat_history"]][:n // 2] + [r for r in every if not r["chat_history"]])[:n]
        path = tmp_path / f"{name}.jsonl"
        path.write_text(json.dumps(rows[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in rows[1:]))
        expected = tmp_path / "expected" / f"{name}.jsonl"
        expected.parent.mkdir(exist_ok=True)
        lines = []
        for row in read_rows(str(path)):
            gold = row.data["gold_docs"]
            ranking = _independent_ranking(minilm, row.data["question"], docs)
            others = [docs[i].to_dict() for i in ranking if not any(same_document(docs[i], g) for g in gold)]
            passages = _seeded_order(seed, row.line, row.data["question"], gold + others[: k - len(gold)])
            lines += [""] * (row.line - 1 - len(lines)) + [json.dumps({**row.data, F.CONTEXT_DOCS_KEY: passages})]
        expected.write_text("\n".join(lines) + "\n")
        written[name] = path
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, "--train_file", str(written["train"]), "--eval_file", str(written["eval"]),
               "--test_file", str(written["test"]), "--rqa_context", "retrieved", "--retrieval_top_k", str(k),
               "--seed", str(seed), "--cutoff_len", "4096")
    template = load_template(None, smol_tokenizer)
    step = retrieval_step(cfg, retriever)
    splits = build_splits(cfg, smol_tokenizer, template, step)
    items = prediction_items(cfg.data.test_file, smol_tokenizer, template, encode_settings(cfg), rewrite=step)
    assert not out.exists() or not any(out.rglob("*"))  # nothing written under output_dir

    exp = {n: str(tmp_path / "expected" / f"{n}.jsonl") for n in ("train", "eval", "test")}
    settings, cache = encode_settings(cfg), str(tmp_path / "cache-expected")
    for split, got in (("train", splits.train), ("eval", splits.eval)):
        want, _ = tokenize_files([exp[split]], split, smol_tokenizer, template, settings, cache_dir=cache)
        assert len(got) == len(want) > 0
        assert [dict(e) for e in got] == [dict(e) for e in want]
    want_items = prediction_items([exp["test"]], smol_tokenizer, template, settings)
    assert [i.prompt_ids for i in items] == [i.prompt_ids for i in want_items]
    for got_item, row in zip(items, read_rows(exp["test"])):
        for p in row.data[F.CONTEXT_DOCS_KEY]:
            assert p["page_content"] in got_item.prompt


def test_a_changed_index_is_not_served_from_the_tokenized_cache(tmp_path, retriever, minilm, smol_tokenizer):
    """The cache key includes the index's identity: another collection (fewer passages) re-tokenizes."""
    from sftlab.data.dataset import cache_key
    from sftlab.data.splits import encode_settings
    from sftlab.rqa.index import load_or_build_index

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _jsonl(TRAIN)[:3]))
    cfg = _cfg(tmp_path, "--train_file", str(data), "--rqa_context", "retrieved", "--retrieval_top_k", "2")
    template = load_template(None, smol_tokenizer)
    smaller = load_or_build_index(load_documents(DOCS_JSONL)[:-1], minilm, tmp_path / "smaller-index")
    keys = {cache_key([str(data)], smol_tokenizer, template, encode_settings(cfg), None, step)
            for step in (retrieval_step(cfg, retriever), retrieval_step(cfg, smaller), None)}
    assert len(keys) == 3
    same = cache_key([str(data)], smol_tokenizer, template, encode_settings(cfg), None, retrieval_step(cfg, retriever))
    assert same in keys  # the same index and settings: the same entry


def test_retrieved_context_needs_a_collection(tmp_path):
    from sftlab.errors import ConfigError
    from sftlab.workflow import preflight

    cfg = parse_config(["--output_dir", str(tmp_path), "--train_file", TRAIN, "--rqa_context", "retrieved"])
    with pytest.raises(ConfigError, match="full_dataset_file_path"):
        preflight(cfg)


# ---- the evaluator against independent recomputation ---------------------------------------------------------
def test_e2e_evaluator_scores_match_independent_computation(tmp_path, tiny_model_dir, retriever, minilm):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftlab.eval.metrics import rouge_tokenize, token_f1

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.train()
    template = load_template(None, tokenizer)
    cfg = _cfg(tmp_path, "--test_file", TEST, "--max_samples", "5", "--retrieval_top_k", "2",
               "--max_new_tokens", "6", "--do_sample", "true", "--temperature", "5.0", "--bf16", "false")
    rows = e2e.load_e2e_rows(cfg.data.test_file, cfg)
    # A gold passage that is nowhere in the collection: recall must count this question as a miss.
    rows[0] = Row({**rows[0].data, "gold_docs": [{"page_content": "Nothing like this exists.", "metadata": {}}]},
                  rows[0].file, rows[0].line)
    result = e2e.E2EEvaluator(cfg, tokenizer, template, retriever).evaluate(model, rows)
    m, preds = result.metrics, result.predictions
    assert model.training  # train mode restored

    docs = load_documents(DOCS_JSONL)
    hits1 = hits2 = 0
    for row, pred in zip(rows, preds):
        ranking = _independent_ranking(minilm, row.data["question"], docs)[:2]
        assert pred["retrieved_sources"] == [docs[i].source for i in ranking]
        gold = row.data["gold_docs"]
        hits1 += any(same_document(docs[ranking[0]], g) for g in gold)
        hits2 += any(same_document(docs[i], g) for i in ranking for g in gold)
        # Greedy decoding (do_sample is overridden) of exactly the prompt with the retrieved passages.
        prompt = e2e.e2e_prompt_ids(tokenizer, template, row.data, [docs[i].to_dict() for i in ranking], 1024)
        out = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        new = out[0, len(prompt):].tolist()
        stops = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        new = new[: next((i for i, t in enumerate(new) if t in stops), len(new))]
        assert pred["generated_answer"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    assert m["e2e_questions"] == 5
    assert m["e2e_recall@1"] == pytest.approx(hits1 / 5) and m["e2e_recall@2"] == pytest.approx(hits2 / 5)
    assert hits2 == 4  # the example retriever finds every real gold passage; the invented one is a miss
    answers, golds = [p["generated_answer"] for p in preds], [p["gold_answer"] for p in preds]
    assert m["e2e_f1"] == pytest.approx(100 * np.mean([token_f1(a, g) for a, g in zip(answers, golds)]))
    cos = np.sum(minilm.embed_queries(answers) * minilm.embed_queries(golds), axis=1)
    assert m["e2e_embedding_similarity"] == pytest.approx(float(np.mean(cos)), abs=1e-5)
    assert 0.0 <= m["e2e_rouge-l"] <= 100.0 and m["e2e_latency_s"] > 0
    if not any(set(rouge_tokenize(a)) & set(rouge_tokenize(g)) for a, g in zip(answers, golds)):
        assert m["e2e_rouge-l"] == 0.0


# ---- LocalRQA's command line through `sftlab train` ----------------------------------------------------------
def test_localrqa_command_line_trains_and_writes_e2e_results(tmp_path, sp_tokenizer, capsys):
    from sftlab.cli import main
    from tests.helpers import make_tiny_model_dir

    tok_dir = tmp_path / "tok"
    sp_tokenizer.save_pretrained(tok_dir)
    model_dir = make_tiny_model_dir(tmp_path / "model", str(tok_dir))
    out, index = tmp_path / "out", tmp_path / "e5-v2-index"
    argv = [
        "train",
        "--use_flash_attention", "true",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--learning_rate", "1e-3",
        "--num_train_epochs", "1",
        "--model_name_or_path", model_dir,
        "--assistant_prefix", "[/INST]",
        "--user_prefix", "<s>[INST]",
        "--sep_user", " ",
        "--sep_sys", "</s>",
        "--eval_embedding_model", "sentence-transformers/all-MiniLM-L6-v2",
        "--logging_steps", "1",
        "--eval_strategy", "steps",
        "--eval_steps", "1",
        "--output_dir", str(out),
        "--train_file", TRAIN,
        "--eval_file", EVAL,
        "--test_file", TEST,
        "--full_dataset_file_path", DOCS_PKL,
        "--full_dataset_index_path", str(index),
        # keep it small
        "--max_samples", "6",
        "--e2e_max_questions", "3",
        "--max_new_tokens", "4",
        "--bf16", "false",
        "--data_cache_dir", str(tmp_path / "cache"),
        "--save_strategy", "no",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    for name in ("adapter_model.safetensors", "trainer_log.jsonl", "e2e_eval_results.json", "e2e_predictions.jsonl",
                 "e2e_eval_predictions.jsonl", "sftlab_config.yaml", "all_results.json"):
        assert (out / name).is_file(), name
    assert json.loads((index / "manifest.json").read_text())["count"] == len(load_documents(DOCS_PKL))

    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    e2e_records = [r for r in log if "e2e_f1" in r]
    # 6 rows / batch 4 = 2 steps, evaluated after each, plus the final do_eval evaluation.
    assert [r["step"] for r in e2e_records] == [1, 2, 2]
    for r in e2e_records:
        assert r["e2e_questions"] == 3
        assert 0.0 <= r["e2e_recall@1"] <= r["e2e_recall@4"] <= 1.0
        assert 0.0 <= r["e2e_f1"] <= 100.0 and 0.0 <= r["e2e_rouge-l"] <= 100.0
        assert -1.0 <= r["e2e_embedding_similarity"] <= 1.0 and r["e2e_latency_s"] > 0

    results = json.loads((out / "e2e_eval_results.json").read_text())
    assert results["e2e_questions"] == 6  # every test question (max_samples), not the in-training cap
    assert results["e2e_recall@4"] == 1.0  # MiniLM finds every gold passage of the example data
    preds = [json.loads(line) for line in (out / "e2e_predictions.jsonl").read_text().splitlines()]
    test_rows = _jsonl(TEST)[:6]
    assert [p["question"] for p in preds] == [r["question"] for r in test_rows]
    assert [p["gold_answer"] for p in preds] == [r["gold_answer"] for r in test_rows]
    for p, r in zip(preds, test_rows):
        assert len(p["retrieved_sources"]) == 4 and isinstance(p["generated_answer"], str)
        assert p["gold_retrieved"] == (r["gold_docs"][0]["metadata"]["source"] in p["retrieved_sources"])
    assert json.loads((out / "all_results.json").read_text())["e2e_f1"] == results["e2e_f1"]
