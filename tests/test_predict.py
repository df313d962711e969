"""`sftlab predict` on an output directory: the same eval_loss as the trainer reported, and prediction files."""

from __future__ import annotations

import json

import pytest

from sftlab.cli import main


def test_predict_on_lora_output_dir_reproduces_eval_loss_and_writes_predictions(tmp_path, tiny_model_dir):
    rows = [{"instruction": f"Repeat the word number {i}.", "output": f"word {i}"} for i in range(20)]
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[:14]) + "\n")
    ev.write_text("\n".join(json.dumps(r) for r in rows[14:]) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--train_file", str(train), "--eval_file", str(ev),
                 "--output_dir", str(out), "--max_steps", "4", "--per_device_train_batch_size", "2",
                 "--learning_rate", "5e-3", "--bf16", "false", "--do_eval", "--save_strategy", "no",
                 "--per_device_eval_batch_size", "4", "--data_cache_dir", str(tmp_path / "cache")]) == 0
    reported = json.loads((out / "eval_results.json").read_text())
    assert 0 <= reported["eval_accuracy"] <= 1 and reported["eval_perplexity"] > 1

    assert main(["predict", str(out), "--eval_file", str(ev), "--test_file", str(ev), "--max_new_tokens", "6",
                 "--per_device_eval_batch_size", "3", "--data_cache_dir", str(tmp_path / "cache")]) == 0
    pred_dir = out / "predict"
    again = json.loads((pred_dir / "eval_results.json").read_text())
    # Different batch size, merged adapter: the token-level mean loss is the same number.
    assert again["eval_loss"] == pytest.approx(reported["eval_loss"], rel=1e-5)
    assert again["eval_accuracy"] == pytest.approx(reported["eval_accuracy"])
    lines = [json.loads(l) for l in (pred_dir / "generated_predictions.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and all(set(l) == {"prompt", "predict", "label"} for l in lines)
    assert lines[0]["label"] == "word 14" and "Repeat the word number 14." in lines[0]["prompt"]
    assert lines[0]["prompt"].endswith("<|im_start|>assistant\n")  # the saved template, generation prompt included
    res = json.loads((pred_dir / "predict_results.json").read_text())
    for k in ("predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4", "predict_exact_match",
              "predict_f1", "predict_generation_tokens_per_second"):
        assert k in res, k
    for k in ("predict_rouge-1", "predict_rouge-l", "predict_bleu-4", "predict_exact_match", "predict_f1"):
        assert 0 <= res[k] <= 100


def test_eval_loss_is_independent_of_eval_batch_size(tmp_path, tiny_model_dir):
    """Token-level micro-averaging: batch 1 and batch 5 give the same eval_loss (HF's default averages batches)."""
    rows = [{"instruction": "q" * (i + 1), "output": "a " * (i % 4 + 1)} for i in range(10)]
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    results = []
    for bs in ("1", "5"):
        out = tmp_path / f"out{bs}"
        assert main(["predict", tiny_model_dir, "--eval_file", str(ev), "--output_dir", str(out), "--bf16", "false",
                     "--per_device_eval_batch_size", bs, "--template", "chatml",
                     "--data_cache_dir", str(tmp_path / "cache")]) == 0
        results.append(json.loads((out / "eval_results.json").read_text()))
    assert results[0]["eval_loss"] == pytest.approx(results[1]["eval_loss"], rel=1e-5)
    assert results[0]["eval_trained_tokens"] == results[1]["eval_trained_tokens"]


def test_load_best_model_at_end_picks_the_best_checkpoint(tmp_path, tiny_model_dir):
    """metric_for_best_model=eval_loss: the final adapter is the one of the checkpoint with the lowest eval_loss."""
    from safetensors.torch import load_file
    import torch

    rows = [{"instruction": f"Say {i}", "output": f"{i} {i} {i}"} for i in range(16)]
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows[:12]) + "\n")
    ev.write_text("\n".join(json.dumps(r) for r in rows[12:]) + "\n")
    out = tmp_path / "out"
    # A learning rate high enough that eval loss is not monotone, so "best" is not simply "last".
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--train_file", str(train), "--eval_file", str(ev),
                 "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "2",
                 "--learning_rate", "0.3", "--lr_scheduler_type", "constant", "--warmup_steps", "0",
                 "--bf16", "false", "--eval_strategy", "steps", "--eval_steps", "2", "--save_steps", "2",
                 "--load_best_model_at_end", "true", "--metric_for_best_model", "eval_loss",
                 "--save_total_limit", "1", "--data_cache_dir", str(tmp_path / "cache")]) == 0
    log = [json.loads(l) for l in (out / "trainer_log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in log if "eval_loss" in r and r["step"] in (2, 4, 6)}
    best_step = min(evals, key=evals.get)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"].endswith(f"checkpoint-{best_step}")
    assert (out / f"checkpoint-{best_step}").is_dir()  # kept despite save_total_limit=1
    final = load_file(str(out / "adapter_model.safetensors"))
    best = load_file(str(out / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    assert final.keys() == best.keys() and all(torch.equal(final[k], best[k]) for k in final)
    reported = json.loads((out / "eval_results.json").read_text())["eval_loss"]
    assert reported == pytest.approx(evals[best_step], rel=1e-5)


def test_train_then_predict_with_bf16_lora(tmp_path, tiny_model_dir):
    """With bf16 a LoRA run keeps frozen weights in bf16 and the adapter in fp32; predicting right after training
    must still work (mixed weights are generated under autocast)."""
    rows = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(8)]
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--train_file", str(f), "--test_file", str(f),
                 "--do_predict", "--output_dir", str(out), "--max_steps", "2", "--bf16", "true",
                 "--max_new_tokens", "3", "--save_strategy", "no", "--data_cache_dir", str(tmp_path / "c")]) == 0
    lines = (out / "generated_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 8


def test_eval_loss_same_with_and_without_packing_and_packed_training_runs(tmp_path, tiny_model_dir):
    """Through the CLI: packing changes how rows are laid out, not the eval loss; a packed training run works."""
    rows = [{"instruction": "word " * (i % 7 + 1), "output": "ok " * (i % 3 + 1)} for i in range(12)]
    ev = tmp_path / "eval.jsonl"
    ev.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    losses = []
    for packing in ("false", "true"):
        out = tmp_path / f"eval-{packing}"
        assert main(["predict", tiny_model_dir, "--eval_file", str(ev), "--output_dir", str(out), "--bf16", "false",
                     "--packing", packing, "--cutoff_len", "256", "--per_device_eval_batch_size", "2",
                     "--template", "chatml", "--data_cache_dir", str(tmp_path / "cache")]) == 0
        losses.append(json.loads((out / "eval_results.json").read_text()))
    assert losses[0]["eval_loss"] == pytest.approx(losses[1]["eval_loss"], rel=1e-5)
    assert losses[0]["eval_trained_tokens"] == losses[1]["eval_trained_tokens"]
    out = tmp_path / "train-packed"
    assert main(["train", "--model_name_or_path", tiny_model_dir, "--train_file", str(ev), "--packing", "true",
                 "--cutoff_len", "256", "--output_dir", str(out), "--max_steps", "2", "--bf16", "false",
                 "--save_strategy", "no", "--data_cache_dir", str(tmp_path / "cache")]) == 0
    res = json.loads((out / "train_results.json").read_text())
    assert res["train_trained_tokens"] > 0 and res["train_loss"] > 0


def test_predict_on_a_model_name(tmp_path, tiny_model_dir):
    """`sftlab predict MODEL` for a base model: no output dir of its own, no saved config."""
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"instruction": "Hi", "output": "Hello"}) + "\n")
    out = tmp_path / "pred"
    assert main(["predict", tiny_model_dir, "--test_file", str(f), "--output_dir", str(out), "--template", "chatml",
                 "--max_new_tokens", "2", "--data_cache_dir", str(tmp_path / "c")]) == 0
    assert (out / "generated_predictions.jsonl").is_file() and (out / "predict_results.json").is_file()


def test_predict_parses_generated_tool_calls_and_scores_them(tmp_path, tiny_model_dir, monkeypatch):
    """generated_predictions.jsonl keeps the generated text and adds the calls parsed; exact match of the calls is
    a metric over the rows whose label makes calls. The generations are scripted (a random tiny model writes no
    calls): one right call, one with wrong arguments, one that is no call."""
    from sftlab.eval import generate

    call = lambda city: {"role": "assistant", "tool_calls": [  # noqa: E731
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}]}
    rows = [{"messages": [{"role": "user", "content": f"Weather in {c}?"}, call(c)],
             "tools": [{"name": "get_weather", "parameters": {"type": "object"}}]} for c in ("Paris", "Rome", "Oslo")]
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]})
    f = tmp_path / "calls.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    scripted = ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Roma"}}\n</tool_call>',
                "It is sunny.", "Hello"]

    def fake_generate(model, tokenizer, prompts, *a, **kw):
        assert len(prompts) == 4 and "<tools>" in tokenizer.decode(prompts[0])
        return generate.GenerationResult([[1]] * 4, scripted, 4, 1.0)

    monkeypatch.setattr(generate, "generate_batched", fake_generate)
    out = tmp_path / "pred"
    assert main(["predict", tiny_model_dir, "--test_file", str(f), "--output_dir", str(out),
                 "--data_cache_dir", str(tmp_path / "c")]) == 0
    lines = [json.loads(l) for l in (out / "generated_predictions.jsonl").read_text().splitlines()]
    assert [l["predict"] for l in lines] == scripted
    assert lines[0]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    assert lines[1]["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Roma"}}]
    assert "tool_calls" not in lines[2] and "tool_calls" not in lines[3]
    assert lines[0]["label"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    res = json.loads((out / "predict_results.json").read_text())
    assert res["predict_tool_call_exact_match"] == pytest.approx(100 / 3)
    assert res["predict_tool_call_name_match"] == pytest.approx(200 / 3)
    assert res["predict_tool_call_rows"] == 3
