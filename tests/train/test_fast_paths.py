"""The speed paths against plain computations: fused LM head + CE, varlen attention, bf16-stored frozen weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sftlab.data.collator import SFTCollator, mask_mode_for_attention
from sftlab.accel.attention import VARLEN_ATTENTION, register_varlen_attention
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
    from sftlab.data.splits import ListDataset

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
