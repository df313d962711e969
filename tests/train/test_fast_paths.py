"""The speed paths against plain computations: fused LM head + CE, varlen attention, bf16-stored frozen weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.collator import SFTCollator, mask_mode_for_attention
from sftlab.train.attention import VARLEN_ATTENTION, register_varlen_attention
from sftlab.train.loss import compute_sft_loss, fused_linear_cross_entropy
from tests.helpers import tiny_llama_config

VOCAB = 300


def _head_case(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(16, 50, bias=bias)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=g))
        if bias:
            head.bias.copy_(torch.randn(50, generator=g))
    hidden = torch.randn(23, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (23,), generator=g)
    return head, hidden, targets


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_fused_head_matches_plain_ce_in_fp32(bias, chunk):
    head, hidden, targets = _head_case(0, bias)
    ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    # A non-trivial upstream gradient: backward must scale the saved gradients by it.
    (ref * 0.37).backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone()] + ([head.bias.grad.clone()] if bias else [])
    hidden.grad = None
    head.zero_grad(set_to_none=True)

    got = fused_linear_cross_entropy(hidden, head, targets, chunk_size=chunk)
    (got * 0.37).backward()
    got_grads = [hidden.grad, head.weight.grad] + ([head.bias.grad] if bias else [])
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk", [300, 1024])
def test_fused_head_with_more_rows_than_one_gradient_product(chunk):
    """600 trained positions: the hidden-state gradient is made in several row products, across chunks too."""
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 50, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(50, 16, generator=g))
    hidden = torch.randn(600, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (600,), generator=g)
    F.cross_entropy(head(hidden), targets, reduction="sum").backward()
    ref_h, ref_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    fused_linear_cross_entropy(hidden, head, targets, chunk_size=chunk).backward()
    torch.testing.assert_close(hidden.grad, ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, ref_w, rtol=1e-5, atol=1e-4)


def test_fused_head_under_autocast_matches_autocast_ce():
    """bf16 autocast: same loss and gradients as autocast's own linear + fp32 CE, to bf16 rounding."""
    head, hidden, targets = _head_case(1, bias=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = F.cross_entropy(head(hidden).float(), targets, reduction="sum")
    ref.backward()
    ref_h, ref_w = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_cross_entropy(hidden, head, targets, chunk_size=8)
    got.backward()
    assert got.dtype == torch.float32 and hidden.grad.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-3, atol=1e-3)
    # Both round softmax - one_hot to bf16 before the matmuls; the summation order differs.
    torch.testing.assert_close(hidden.grad, ref_h, rtol=2e-2, atol=2e-2 * float(ref_h.abs().max()))
    torch.testing.assert_close(head.weight.grad, ref_w, rtol=2e-2, atol=2e-2 * float(ref_w.abs().max()))


def test_fused_head_with_log_probs_below_the_denormal_floor():
    """Logits spread over hundreds of nats (a confident model): probabilities under fp32's smallest normal are
    floored rather than computed as denormals (slow); loss and gradients still equal plain CE, including a target
    whose own log-prob is far below the floor."""
    head, hidden, targets = _head_case(3, bias=False)
    with torch.no_grad():
        head.weight.mul_(40.0)
    logits = head(hidden).float()
    lp = torch.log_softmax(logits, -1)
    assert float(lp.min()) < -500 and float(lp[torch.arange(len(targets)), targets].min()) < -87
    ref = F.cross_entropy(logits, targets, reduction="sum")
    ref.backward()
    ref_grads = [hidden.grad.clone(), head.weight.grad.clone()]
    hidden.grad = None
    head.zero_grad(set_to_none=True)
    got = fused_linear_cross_entropy(hidden, head, targets)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)
    for a, b in zip([hidden.grad, head.weight.grad], ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)


def test_fused_head_keeps_confident_target_gradient():
    """p(target) ~ 0.999: the target's gradient p - 1 ~ -1e-3 must survive the bf16 matmul dtype."""
    head = torch.nn.Linear(4, 8, bias=False)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[3, 0] = 10.0
    hidden = torch.tensor([[1.0, 0.0, 0.0, 0.0]], requires_grad=True)
    targets = torch.tensor([3])
    logits = head(hidden).float()
    expected = torch.softmax(logits, -1)[0, 3] - 1  # d loss / d logit_target
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused_linear_cross_entropy(hidden, head, targets).backward()
    # d loss / d W[3, 0] = (p_t - 1) * h_0 = p_t - 1
    assert abs(float(head.weight.grad[3, 0]) - float(expected)) < 0.01 * abs(float(expected))


def _model(attn: str = "sdpa", seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(VOCAB, attn_implementation="sdpa")).float().train()
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


def _features(lengths=(9, 1, 17, 4, 30), seed: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, VOCAB, (n,), generator=g).tolist()
        prompt = int(torch.randint(0, n, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_varlen_flat_batch_matches_each_example_alone():
    """One padding-free row with varlen attention == summing each example run on its own (loss and grads)."""
    name = register_varlen_attention()
    assert mask_mode_for_attention(name) == "flatten"
    feats = _features()
    model = _model()
    ref = sum(compute_sft_loss(model, SFTCollator(0)([f]), chunk_size=4).loss_sum for f in feats)
    ref.backward()
    ref_grads = _grads(model)

    model.set_attn_implementation(name)
    batch = SFTCollator(0, mask_mode="flatten")(feats)
    assert batch["input_ids"].shape[0] == 1
    got = compute_sft_loss(model, batch, chunk_size=4).loss_sum
    got.backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    got_grads = _grads(model)
    assert got_grads.keys() == ref_grads.keys()
    for k in ref_grads:
        torch.testing.assert_close(got_grads[k], ref_grads[k], rtol=1e-4, atol=1e-5 * float(ref_grads[k].abs().max()))


def test_varlen_without_boundaries_is_plain_sdpa():
    """Padded batches and generation (no cu_seq_lens) go to sdpa with sdpa's mask: identical logits."""
    register_varlen_attention()
    feats = _features((6, 11, 3))
    batch = SFTCollator(0)(feats)
    model = _model().eval()
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        model.set_attn_implementation(VARLEN_ATTENTION)
        got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_varlen_rejects_boundaries_that_do_not_cover_the_row():
    register_varlen_attention()
    model = _model(VARLEN_ATTENTION)
    batch = SFTCollator(0, mask_mode="flatten")(_features((5, 6)))
    batch["cu_seq_lens_q"] = torch.tensor([0, 5, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q covers 10 tokens"):
        compute_sft_loss(model, batch)


def test_bf16_frozen_linears_give_the_same_numbers_as_autocast(tmp_path):
    """workflow.cpu_training_speedups stores frozen linear weights in bf16: under autocast the loss and the
    LoRA gradients are what autocast over fp32 weights gives (it rounds those weights to bf16 itself)."""
    from peft import LoraConfig, get_peft_model

    from sftlab.config import parse_config
    from sftlab.train.linear import use_fused_linears
    from sftlab.train.norm import use_fused_rms_norms
    from sftlab.train.swiglu import use_fused_swiglu
    from sftlab.workflow import cpu_training_speedups

    def lora_model():
        m = get_peft_model(_model(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                init_lora_weights=False))
        return m.train()

    batch = SFTCollator(0)(_features())
    ref_model, model = lora_model(), lora_model()
    cfg = parse_config([], overrides=dict(output_dir=str(tmp_path), bf16=True, use_cpu=True,
                                          finetuning_type="lora"))
    done = cpu_training_speedups(model, cfg)
    assert any("bf16" in line for line in done) and any("varlen" in line for line in done)
    assert any("native CPU kernels" in line for line in done)  # built (or found missing) before training
    # The fused functions (compared with peft / transformers in test_linear.py, test_norm.py, test_rotary.py) on
    # both, so only the storage differs.
    assert any("fused" in line for line in done)
    use_fused_linears(ref_model, skip=(ref_model.get_base_model().lm_head,))
    use_fused_rms_norms(ref_model)
    use_fused_swiglu(ref_model)
    base = model.get_base_model()
    assert base.model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.model.embed_tokens.weight.dtype == torch.float32  # tied LM head stays fp32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)

    # Same (padded) batch layout for both, so only the weight storage differs.
    base.set_attn_implementation("sdpa")
    results = []
    for m in (ref_model, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = compute_sft_loss(m, batch).loss_sum
        loss.backward()
        results.append((loss.detach(), _grads(m)))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-6)
    for k, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][k], g, rtol=1e-5, atol=1e-6 * float(g.abs().max()))


@pytest.mark.parametrize("budget", [1, 10, 31, 1000])
def test_split_flat_batch_pieces_add_up_to_the_batch(budget):
    """Pieces keep examples whole, cover the row once, stay within budget (unless one example is longer), and
    their summed loss and gradients equal the whole batch's."""
    from sftlab.data.collator import split_flat_batch

    register_varlen_attention()
    feats = _features()
    batch = SFTCollator(0, mask_mode="flatten")(feats)
    batch["sftlab_real_tokens"] = torch.tensor(61)
    pieces = split_flat_batch(batch, budget)
    assert torch.equal(torch.cat([p["input_ids"] for p in pieces], 1), batch["input_ids"])
    assert torch.equal(torch.cat([p["position_ids"] for p in pieces], 1), batch["position_ids"])
    seen = [int(n) for p in pieces for n in p["cu_seq_lens_q"].diff()]
    assert seen == [len(f["input_ids"]) for f in feats]
    for p in pieces:
        n = p["input_ids"].shape[1]
        assert int(p["cu_seq_lens_q"][-1]) == n and (n <= budget or len(p["cu_seq_lens_q"]) == 2)
    assert "sftlab_real_tokens" in pieces[0] and all("sftlab_real_tokens" not in p for p in pieces[1:])
    if budget == 1000:
        assert pieces == [batch]

    model = _model(VARLEN_ATTENTION)
    ref = compute_sft_loss(model, batch).loss_sum
    ref.backward()
    ref_grads = _grads(model)
    got = 0
    for p in pieces:
        loss = compute_sft_loss(model, p).loss_sum
        loss.backward()
        got = got + loss.detach()
    torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-5)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-5 * float(ref_grads[k].abs().max()))


def test_trainer_token_budget_gives_the_same_step(tmp_path):
    """SFTTrainer with max_tokens_per_forward: several forward/backward passes, the same optimizer step and
    the same token counts as one pass over the batch."""
    from transformers import TrainingArguments

    from sftlab.train.trainer import CountingCollator, SFTTrainer
    from sftlab.workflow import ListDataset

    register_varlen_attention()
    feats = _features()
    results = []
    for budget in (None, 12):
        model = _model(VARLEN_ATTENTION)
        args = TrainingArguments(output_dir=str(tmp_path / str(budget)), per_device_train_batch_size=len(feats),
                                 max_steps=1, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant",
                                 use_cpu=True, report_to="none", remove_unused_columns=False, save_strategy="no",
                                 disable_tqdm=True, seed=0)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ListDataset(feats),
                             data_collator=CountingCollator(SFTCollator(0, mask_mode="flatten")),
                             max_tokens_per_forward=budget)
        out = trainer.train()
        results.append((out.training_loss, trainer.global_token_counts(),
                        {n: p.detach().clone() for n, p in model.named_parameters()}))
    (loss_a, counts_a, params_a), (loss_b, counts_b, params_b) = results
    assert counts_a == counts_b == (sum(len(f["input_ids"]) for f in feats),
                                    sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats))
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    initial = _model().state_dict()
    moved = 0
    for name, p in params_a.items():
        torch.testing.assert_close(params_b[name], p, rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(p, initial[name]))
    assert moved > 0  # the step did train


def test_frozen_head_cast_is_kept_only_while_the_weight_is_frozen_and_unchanged():
    from sftlab.train.loss import _frozen_cast

    w = torch.randn(7, 5)
    a = _frozen_cast(w, torch.bfloat16)
    assert _frozen_cast(w, torch.bfloat16) is a
    with torch.no_grad():
        w.add_(1.0)  # an optimizer step or load_state_dict would do this in place
    b = _frozen_cast(w, torch.bfloat16)
    assert b is not a and torch.equal(b, w.bfloat16())
    trained = torch.randn(7, 5, requires_grad=True)
    assert _frozen_cast(trained, torch.bfloat16) is not _frozen_cast(trained, torch.bfloat16)

    from sftlab.train import loss as loss_module

    assert loss_module._frozen_casts  # w's cast is held ...
    del w, a, b
    assert not loss_module._frozen_casts  # ... until w itself is gone


def test_pad_flat_batch_appends_one_unlabelled_segment():
    from sftlab.data.collator import pad_flat_batch

    feats = _features((3, 5, 2))  # 10 tokens
    batch = SFTCollator(0, mask_mode="flatten")(feats)
    padded = pad_flat_batch(batch, 8, pad_token_id=7)
    assert padded["input_ids"].shape == (1, 16)
    assert padded["input_ids"][0, 10:].tolist() == [7] * 6
    assert torch.equal(padded["input_ids"][:, :10], batch["input_ids"])
    assert padded["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5]
    assert padded["labels"][0, 10:].tolist() == [-100] * 6
    assert padded["shift_labels"][0, 10:].tolist() == [-100] * 6
    assert padded["cu_seq_lens_q"].tolist() == [0, 3, 8, 10, 16] == padded["cu_seq_lens_k"].tolist()
    assert padded["max_length_q"] == padded["max_length_k"] == 6
    assert pad_flat_batch(padded, 8) is padded  # already a multiple
    assert pad_flat_batch(batch, 0) is batch and pad_flat_batch(batch, 1) is batch


@pytest.mark.parametrize("multiple", [7, 64])
def test_padding_a_pass_changes_no_loss_or_gradient(multiple):
    """The padding segment is attended by nothing and trains nothing: loss, trained-token count, accuracy and
    gradients are those of the unpadded batch (fp32), in training and in evaluation."""
    register_varlen_attention()
    batch = SFTCollator(0, mask_mode="flatten")(_features())  # 61 tokens
    model = _model(VARLEN_ATTENTION)
    ref = compute_sft_loss(model, batch)
    ref.loss_sum.backward()
    ref_grads = _grads(model)
    got = compute_sft_loss(model, batch, pad_to_multiple_of=multiple)
    got.loss_sum.backward()
    torch.testing.assert_close(got.loss_sum, ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(got.n_tokens) == int(ref.n_tokens)
    for k, g in _grads(model).items():
        torch.testing.assert_close(g, ref_grads[k], rtol=1e-4, atol=1e-5 * float(ref_grads[k].abs().max()))
    with torch.no_grad():
        ev_ref = compute_sft_loss(model, batch, return_correct=True)
        ev = compute_sft_loss(model, batch, return_correct=True, pad_to_multiple_of=multiple)
    torch.testing.assert_close(ev.loss_sum, ev_ref.loss_sum, rtol=1e-5, atol=1e-5)
    assert int(ev.n_correct) == int(ev_ref.n_correct) and int(ev.n_tokens) == int(ev_ref.n_tokens)


def test_padding_reaches_the_model_as_a_multiple(monkeypatch):
    """What the decoder sees is padded; padded-row batches (no per-example attention) are left alone."""
    register_varlen_attention()
    seen = []
    model = _model(VARLEN_ATTENTION)
    hook = model.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        compute_sft_loss(model, SFTCollator(0, mask_mode="flatten")(_features()), pad_to_multiple_of=64)
        plain = _model("sdpa")
        plain.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
        compute_sft_loss(plain, SFTCollator(0)(_features()), pad_to_multiple_of=64)
    finally:
        hook.remove()
    assert seen[0] == (1, 64)
    assert seen[1] == (5, 30)  # 5 rows padded to the longest example, as the collator made them
