"""`SFTTrainer`: Hugging Face's Trainer with sftlab's exact loss, exact evaluation and token accounting.

* Training loss: the sum of cross-entropy over the trained tokens of a micro-batch divided by the number of trained
  tokens of the whole optimizer step (all micro-batches, all ranks; Trainer counts them from `shift_labels`), so
  batch size, accumulation and packing change speed, never the result.
* Evaluation: loss and accuracy are sums over every trained token of the eval set divided once by their count
  (micro-averaged over tokens, not averaged over batches), reduced per batch; no logits are kept.
  With several processes accelerate repeats samples from the start of the eval set so that every rank gets
  equal batches; those repeats are found with `gather_for_metrics` and their labels masked, so the sums are over
  each eval sample exactly once, as in one process.
* Token counts: non-pad tokens and trained tokens seen by this rank, summed over ranks for the reports.
"""

from __future__ import annotations

import math
import resource
from typing import Callable

import torch
from transformers import Trainer
from transformers.trainer_callback import PrinterCallback

from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.train.callbacks import LogCallback
from sftlab.train.loss import compute_sft_loss


REAL_TOKENS_KEY = "sftlab_real_tokens"
# Tokens of each sample of a batch, in batch order: where each sample lies in a "flatten"-mode batch (one row).
SAMPLE_TOKENS_KEY = "sftlab_sample_tokens"


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def real_token_count(inputs: dict) -> int:
    """Non-pad tokens of a batch: counted by `CountingCollator` from the features, else from the 2-D mask."""
    if REAL_TOKENS_KEY in inputs:
        return int(inputs[REAL_TOKENS_KEY])
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int(mask.sum())
    return int(inputs["input_ids"].numel())


def samples_in_batch(inputs: dict) -> int:
    """How many samples (data set items) a collated batch holds."""
    if "cu_seq_lens_q" not in inputs:
        return int(inputs["input_ids"].shape[0])
    if SAMPLE_TOKENS_KEY not in inputs:
        raise RuntimeError(f"a flatten-mode batch without '{SAMPLE_TOKENS_KEY}' (collate it with CountingCollator): "
                           "its samples cannot be told apart")
    return int(inputs[SAMPLE_TOKENS_KEY].numel())


def without_samples(inputs: dict, keep: torch.Tensor) -> dict:
    """The batch with no trained token in the samples where ``keep`` (one bool per sample) is False."""
    if bool(keep.all()):
        return inputs
    if "cu_seq_lens_q" in inputs:  # one row: sample i holds the i-th span of SAMPLE_TOKENS_KEY tokens
        lengths = inputs[SAMPLE_TOKENS_KEY].to(keep.device)
        owner = torch.repeat_interleave(torch.arange(lengths.numel(), device=keep.device), lengths)
        width = inputs["input_ids"].shape[1]
        dropped = torch.zeros(width, dtype=torch.bool, device=keep.device)
        dropped[: owner.numel()] = ~keep[owner]
        dropped = dropped[None, :]
    else:
        dropped = ~keep[:, None]
    out = dict(inputs)
    for key in ("labels", "shift_labels"):
        if out.get(key) is not None:
            out[key] = out[key].masked_fill(dropped.to(out[key].device), IGNORE_INDEX)
    return out


class CountingCollator:
    """Wraps a collator and records how many real (non-pad) tokens the batch holds, for tokens/s figures."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features: list[dict]) -> dict:
        from sftlab.data.streaming import collate_stream_item

        features, extra = collate_stream_item(features)  # a streamed batch's position, or a bad row's error
        if not features:
            return extra
        batch = self.inner(features)
        lengths = [len(f["input_ids"]) for f in features]
        batch[REAL_TOKENS_KEY] = torch.tensor(sum(lengths))
        batch[SAMPLE_TOKENS_KEY] = torch.tensor(lengths)
        batch.update(extra)
        return batch


class SFTTrainer(Trainer):
    # compute_loss below already divides by the step's trained-token count.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, loss_chunk_size: int = 1024, compute_accuracy: bool = True,
                 max_tokens_per_forward: int | None = None, batch_hook: Callable[[dict], dict] | None = None,
                 save_beside_checkpoint: Callable[[str], None] | None = None, **kwargs):
        """``batch_hook``: called on the inputs of every forward pass (after a token-budget split), before the
        loss; it may reshape the batch (e.g. pad it, see ``sftlab.accel``) but must not change the results.
        ``save_beside_checkpoint(directory)``: writes what travels with every checkpoint (template, config)."""
        from sftlab.train.distributed import die_with_launcher

        die_with_launcher()  # a worker never outlives a killed torchrun / accelerate launch
        super().__init__(*args, **kwargs)
        self.save_beside_checkpoint = save_beside_checkpoint
        # With a streamed training set (sftlab.data.streaming): raises the workers' data errors, keeps the stream
        # position that each checkpoint records. Set by the workflow.
        self.stream_tracker = None
        # sftlab's progress display and trainer_log.jsonl instead of Trainer's raw dicts
        self.remove_callback(PrinterCallback)
        self.add_callback(LogCallback(self.token_counts, self.args.output_dir))
        self.loss_chunk_size = loss_chunk_size
        self.max_tokens_per_forward = max_tokens_per_forward
        self.batch_hook = batch_hook
        self.compute_accuracy = compute_accuracy
        self.tokens_seen = 0  # non-pad tokens, this rank
        self.trained_tokens_seen = 0  # tokens with a label, this rank
        self._eval_sums = None
        # Trainer only counts num_items_in_batch when it believes the model takes loss kwargs; we always want it.
        self.model_accepts_loss_kwargs = True
        if self.is_fsdp_enabled:
            from sftlab.train.distributed import ShardReport

            self.add_callback(ShardReport(lambda: self))

    def create_accelerator_and_postprocess(self) -> None:
        # On CPU ranks accelerate leaves FSDP off; sftlab.train.distributed turns it on (FSDP2).
        super().create_accelerator_and_postprocess()
        from sftlab.train.distributed import enable_fsdp_on_cpu

        enable_fsdp_on_cpu(self)

    def _get_train_sampler(self, train_dataset=None):
        """group_by_length from the lengths the examples store (sftlab.data.store), rather than by reading every
        example of the data set to measure it."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        lengths = getattr(getattr(dataset, "items", dataset), "lengths", None)
        if self.args.train_sampling_strategy == "group_by_length" and callable(lengths):
            from transformers.trainer_pt_utils import LengthGroupedSampler

            return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                        lengths=lengths().tolist())
        return super()._get_train_sampler(train_dataset)

    def get_train_dataloader(self):
        """A streamed training set shards itself by (rank, worker): its DataLoader is not wrapped by accelerate
        (which would shard it again, or read it on rank 0 only and broadcast)."""
        if self.stream_tracker is None:
            return super().get_train_dataloader()
        from torch.utils.data import DataLoader

        a = self.args
        workers = a.dataloader_num_workers
        return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                          num_workers=workers, pin_memory=a.dataloader_pin_memory,
                          persistent_workers=a.dataloader_persistent_workers if workers else False,
                          prefetch_factor=a.dataloader_prefetch_factor if workers else None,
                          multiprocessing_context=a.dataloader_multiprocessing_context if workers else None)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.stream_tracker is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        observed = (self.stream_tracker.observe(batch) for batch in epoch_iterator)
        return super().get_batch_samples(observed, num_batches, device)

    # ---- training --------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training:
            self.tokens_seen += real_token_count(inputs)
        parts = compute_sft_loss(model, self._shaped(inputs), chunk_size=self.loss_chunk_size)
        if model.training:
            self.trained_tokens_seen += int(parts.n_tokens)
        if num_items_in_batch is not None:
            denom = num_items_in_batch
            if torch.is_tensor(denom):
                denom = denom.to(parts.loss_sum.device)
            loss = parts.loss_sum / torch.clamp_min(torch.as_tensor(denom, dtype=parts.loss_sum.dtype,
                                                                     device=parts.loss_sum.device), 1)
            if self.args.average_tokens_across_devices and self.args.world_size > 1:
                # DDP averages gradients over ranks; the count already covers all ranks, so undo that average.
                loss = loss * self.args.world_size
        else:
            loss = parts.loss_sum / torch.clamp_min(parts.n_tokens.to(parts.loss_sum.dtype), 1)
        return (loss, None) if return_outputs else loss

    def _shaped(self, inputs: dict) -> dict:
        return self.batch_hook(inputs) if self.batch_hook is not None else inputs

    def training_step(self, model, inputs, num_items_in_batch=None):
        budget = self.max_tokens_per_forward
        # Padding-free batches over the token budget run as several forward/backward passes: the loss is divided
        # by the whole step's token count, so the summed gradients are the step's, and activation memory is that
        # of one piece. Single process only (DDP would all-reduce after every backward).
        if (not budget or num_items_in_batch is None or self.args.world_size > 1
                or "cu_seq_lens_q" not in inputs):
            return super().training_step(model, inputs, num_items_in_batch)
        from sftlab.data.collator import split_flat_batch

        pieces = split_flat_batch(inputs, budget)
        for piece in pieces[1:]:
            if REAL_TOKENS_KEY in inputs:
                piece[REAL_TOKENS_KEY] = 0  # the first piece carries the batch's count
        total = None
        for piece in pieces:
            loss = super().training_step(model, piece, num_items_in_batch)
            total = loss if total is None else total + loss
        return total

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def _save_checkpoint(self, model, trial):
        # Staged, then renamed to checkpoint-N when complete: a crash mid-save never leaves a checkpoint that
        # resume would pick but cannot load (see sftlab.train.checkpoint).
        from sftlab.train.checkpoint import save_checkpoint_atomically

        save_checkpoint_atomically(self, model, trial)

    # ---- evaluation ------------------------------------------------------------------------------------------
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        if self.accelerator.num_processes > 1:
            inputs = without_samples(inputs, self._real_samples(samples_in_batch(inputs)))
        with torch.no_grad(), self.compute_loss_context_manager():
            parts = compute_sft_loss(model, self._shaped(inputs), chunk_size=self.loss_chunk_size,
                                     return_correct=True)
        sums = self._eval_sums
        if sums is not None:
            sums += torch.stack([parts.loss_sum.detach().double(), parts.n_tokens.double(),
                                 parts.n_correct.double()]).to(sums.device)
        loss = parts.loss_sum.detach() / torch.clamp_min(parts.n_tokens.to(parts.loss_sum.dtype), 1)
        return loss, None, None

    def _real_samples(self, n: int) -> torch.Tensor:
        """Which of this rank's ``n`` eval samples are not repeats. accelerate's eval sampler repeats samples from
        the start of the data set so that every rank gets equal batches, and ``gather_for_metrics`` drops exactly
        those repeats from what it gathers: the samples of this rank that it keeps are the real ones. Called on
        every rank at every eval batch (it is a collective)."""
        device = self.args.device
        rank = self.accelerator.process_index
        tags = torch.stack([torch.full((n,), rank, device=device), torch.arange(n, device=device)], dim=1)
        kept = self.accelerator.gather_for_metrics(tags)
        keep = torch.zeros(n, dtype=torch.bool, device=device)
        keep[kept[kept[:, 0] == rank, 1]] = True
        return keep

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._eval_sums = torch.zeros(3, dtype=torch.float64, device=self.args.device)
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only=True,
                                             ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            sums = self._eval_sums
            if self.args.world_size > 1:
                sums = self.accelerator.reduce(sums, reduction="sum")
            loss_sum, n, correct = (float(x) for x in sums)
        finally:
            self._eval_sums = None
        if n > 0:
            loss = loss_sum / n
            output.metrics[f"{metric_key_prefix}_loss"] = loss
            output.metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(loss, 700.0))
            if self.compute_accuracy:
                output.metrics[f"{metric_key_prefix}_accuracy"] = correct / n
            output.metrics[f"{metric_key_prefix}_trained_tokens"] = int(n)
        return output

    # ---- accounting ------------------------------------------------------------------------------------------
    def token_counts(self) -> tuple[int, int]:
        """(non-pad, trained) tokens processed in training so far, this rank."""
        return self.tokens_seen, self.trained_tokens_seen

    def global_token_counts(self) -> tuple[int, int]:
        """(non-pad, trained) tokens processed in training, summed over ranks."""
        t = torch.tensor([self.tokens_seen, self.trained_tokens_seen], dtype=torch.float64, device=self.args.device)
        if self.args.world_size > 1:
            t = self.accelerator.reduce(t, reduction="sum")
        return int(t[0]), int(t[1])
