"""Batch collation for SFT: right padding, per-example shifted targets, and attention kept inside examples.

Keys emitted (all torch tensors unless noted):

* ``input_ids`` (B, T), ``labels`` (B, T; padding -100), ``position_ids`` (B, T; restarting at 0 per example).
* ``shift_labels`` (B, T): per example ``labels[1:] + [-100]``. A target never crosses an example boundary
  inside a pack nor runs into padding. HF Trainer counts ``shift_labels != -100`` for ``num_items_in_batch``.
* ``attention_mask``, depending on ``mask_mode`` and on whether the batch is packed:

  - ``"auto"`` (default; for sdpa, eager and flex attention): unpacked batches get the usual 2-D padding mask
    (B, T). Packed batches get NO ``attention_mask``: transformers' ``masking_utils`` (5.x) then detects the
    packed format from the restarting ``position_ids`` (``find_packed_sequence_indices``; only done when the
    2-D mask is None and there is no KV cache) and builds the per-row block-diagonal causal (B, 1, T, T) mask
    itself. Right padding inside a packed row gets its own restarting positions, so it is just one more
    "sequence" that nothing real attends to.
  - ``"4d"``: an explicit boolean block-diagonal causal mask (B, 1, T, T) for every batch (packed or not);
    for models whose mask code does not detect packing. ``compute_sft_loss`` turns it into an additive mask
    for eager attention; flash attention cannot take it.
  - ``"flatten"`` (for varlen kernels: flash_attention_2/3 on GPU, sftlab's ``"sftlab_varlen"`` on CPU): all
    examples of the batch are concatenated into ONE row (1, N) with no padding (beyond ``pad_to_multiple_of``)
    and no ``attention_mask``; the varlen kernel gets ``cu_seq_lens_q``/``cu_seq_lens_k`` (int32 (S+1,)) and
    ``max_length_q``/``max_length_k`` (python ints). transformers' flash path only infers packing from position
    ids when the batch size is 1, so packed rows with B > 1 and no mask would attend across examples there;
    hence this mode. (With plain sdpa it is still correct but builds a dense N x N mask and attends over all of
    it, so it is meant for varlen kernels only.) ``split_flat_batch`` cuts such a batch into pieces of whole
    examples under a token budget.
"""

from __future__ import annotations

import torch

from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.errors import ConfigError

MASK_MODES = ("auto", "4d", "flatten")


def mask_mode_for_attention(attn_implementation: str | None) -> str:
    """The mask mode that is correct and cheap for a model's attention implementation.

    Varlen kernels (flash attention, sftlab's ``"sftlab_varlen"``) take the whole batch as one padding-free row."""
    if attn_implementation and ("flash" in attn_implementation or attn_implementation == "sftlab_varlen"):
        return "flatten"
    return "auto"


def _segments(feature: dict) -> list[int]:
    """Lengths of the examples inside a feature (a plain example is one segment)."""
    n = len(feature["input_ids"])
    seq_lens = feature.get("seq_lens")
    if seq_lens is None:
        return [n]
    if sum(seq_lens) != n:
        raise ValueError(f"seq_lens {list(seq_lens)} sum to {sum(seq_lens)} but the row has {n} tokens")
    return list(seq_lens)


def _shifted(labels: list[int], seq_lens: list[int]) -> list[int]:
    """Per example labels[1:] + [-100]: each position's target is the next token of the same example."""
    out: list[int] = []
    start = 0
    for n in seq_lens:
        if n:
            out.extend(labels[start + 1 : start + n])
            out.append(IGNORE_INDEX)
        start += n
    return out


def _positions(seq_lens: list[int]) -> list[int]:
    out: list[int] = []
    for n in seq_lens:
        out.extend(range(n))
    return out


class SFTCollator:
    """Collate tokenized examples or packs (see ``sftlab.data.packing``) into a model batch.

    ``pad_to_multiple_of`` rounds the padded length up (in ``"flatten"`` mode: the total length).
    ``mask_mode``: see the module docstring; pick it with ``mask_mode_for_attention``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, mask_mode: str = "auto"):
        if mask_mode not in MASK_MODES:
            raise ConfigError(f"mask_mode must be one of {', '.join(MASK_MODES)}; got '{mask_mode}'")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ConfigError(f"pad_to_multiple_of must be >= 1; got {pad_to_multiple_of}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.mask_mode = mask_mode

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return n if not m else -(-n // m) * m

    def __call__(self, features: list[dict]) -> dict:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        packed = any("seq_lens" in f for f in features)
        rows = []
        for f in features:
            ids, labels = list(f["input_ids"]), list(f["labels"])
            if len(ids) != len(labels):
                raise ValueError(f"input_ids has {len(ids)} tokens but labels has {len(labels)}")
            rows.append((ids, labels, _segments(f)))
        if self.mask_mode == "flatten":
            return self._flatten(rows)
        return self._rows(rows, packed)

    def _rows(self, rows: list[tuple[list[int], list[int], list[int]]], packed: bool) -> dict:
        width = self._round_up(max(len(ids) for ids, _, _ in rows))
        input_ids, labels, shift_labels, position_ids, seg_lens = [], [], [], [], []
        for ids, lab, segs in rows:
            pad = width - len(ids)
            input_ids.append(ids + [self.pad_token_id] * pad)
            labels.append(lab + [IGNORE_INDEX] * pad)
            shift_labels.append(_shifted(lab, segs) + [IGNORE_INDEX] * pad)
            if packed or self.mask_mode == "4d":
                # Padding is its own segment with restarting positions: masking_utils then sees it as a
                # separate sequence (and in the 4-D mask it attends only to itself, never to real tokens).
                segs = segs + [pad] if pad else segs
                position_ids.append(_positions(segs))
            else:
                position_ids.append(list(range(width)))
            seg_lens.append(segs)

        batch = {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "shift_labels": torch.tensor(shift_labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }
        if self.mask_mode == "4d":
            batch["attention_mask"] = block_causal_mask(seg_lens, width)
        elif not packed:
            lengths = torch.tensor([len(ids) for ids, _, _ in rows])
            batch["attention_mask"] = (torch.arange(width)[None, :] < lengths[:, None]).long()
        return batch

    def _flatten(self, rows: list[tuple[list[int], list[int], list[int]]]) -> dict:
        input_ids, labels, shift_labels, segs_all = [], [], [], []
        for ids, lab, segs in rows:
            input_ids.extend(ids)
            labels.extend(lab)
            shift_labels.extend(_shifted(lab, segs))
            segs_all.extend(n for n in segs if n)
        cu = [0]
        for n in segs_all:
            cu.append(cu[-1] + n)
        cu_t = torch.tensor(cu, dtype=torch.int32)
        max_len = max(segs_all) if segs_all else 0
        batch = {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "shift_labels": torch.tensor([shift_labels], dtype=torch.long),
            "position_ids": torch.tensor([_positions(segs_all)], dtype=torch.long),
            "cu_seq_lens_q": cu_t,
            "cu_seq_lens_k": cu_t.clone(),
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
        return pad_flat_batch(batch, self.pad_to_multiple_of or 0, self.pad_token_id)


def block_causal_mask(seg_lens: list[list[int]], width: int) -> torch.Tensor:
    """Boolean (B, 1, T, T) mask, True where query i may attend key j: same segment and j <= i.

    Per-row T x T only (never one mask over the flattened batch)."""
    seg_ids = []
    for segs in seg_lens:
        row: list[int] = []
        for k, n in enumerate(segs):
            row.extend([k] * n)
        row.extend([len(segs)] * (width - len(row)))
        seg_ids.append(row)
    seg = torch.tensor(seg_ids, dtype=torch.long)
    same = seg[:, :, None] == seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    return (same & causal)[:, None, :, :]


def split_flat_batch(batch: dict, max_tokens: int) -> list[dict]:
    """Cut a ``"flatten"``-mode batch at example boundaries into pieces of at most ``max_tokens`` tokens.

    Examples stay whole and in order (one longer than ``max_tokens`` is a piece of its own). Each piece is a
    complete flatten-mode batch with its own ``cu_seq_lens``; other keys (e.g. token counters) stay with the first
    piece. Running the pieces one after another and adding their gradients is the same step as the whole batch
    when the loss is normalized by the step's token count, with activation memory bounded by the budget.
    """
    bounds = batch["cu_seq_lens_q"].tolist()
    spans = split_spans(bounds, max_tokens)
    if len(spans) == 1:
        return [batch]
    per_row = ("input_ids", "labels", "shift_labels", "position_ids")
    pieces = []
    extra = {k: v for k, v in batch.items() if k not in per_row and not k.startswith(("cu_seq_lens", "max_length"))}
    for i, (a, e) in enumerate(spans):
        piece = dict(extra) if i == 0 else {}
        for k in per_row:
            piece[k] = batch[k][:, a:e]
        cu = [x - a for x in bounds if a <= x <= e]
        cu_t = torch.tensor(cu, dtype=torch.int32, device=batch["cu_seq_lens_q"].device)
        longest = max(y - x for x, y in zip(cu[:-1], cu[1:]))
        piece.update(cu_seq_lens_q=cu_t, cu_seq_lens_k=cu_t.clone(), max_length_q=longest, max_length_k=longest)
        pieces.append(piece)
    return pieces


def split_spans(bounds: list[int], max_tokens: int) -> list[tuple[int, int]]:
    """Token ranges (start, end) of the pieces `split_flat_batch` cuts a batch into, from the examples' cumulative
    boundaries (``cu_seq_lens``): whole examples in order, at most ``max_tokens`` per piece unless one example alone
    is longer."""
    if max_tokens < 1:
        raise ConfigError(f"max_tokens must be >= 1; got {max_tokens}")
    if bounds[-1] <= max_tokens:
        return [(0, bounds[-1])]
    spans: list[tuple[int, int]] = []
    start = last = 0
    for b in bounds[1:]:
        if b - start > max_tokens and last > start:
            spans.append((start, last))
            start = last
        last = b
    spans.append((start, bounds[-1]))
    return spans


def pad_flat_batch(batch: dict, multiple: int, pad_token_id: int = 0) -> dict:
    """Round a ``"flatten"``-mode batch's length up to a multiple of ``multiple`` with one extra segment of
    padding (its own example: no label, positions from 0, attended by nothing else), so the token count of a
    forward pass takes few distinct values. Returns ``batch`` itself when it is already a multiple."""
    ids = batch["input_ids"]
    extra = (-ids.shape[1]) % multiple if multiple > 1 else 0
    if extra == 0:
        return batch
    out = dict(batch)

    def grow(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, t.new_full((1, extra), value)], dim=1)

    out["input_ids"] = grow(ids, pad_token_id)
    for key in ("labels", "shift_labels"):
        if key in batch:
            out[key] = grow(batch[key], IGNORE_INDEX)
    if "position_ids" in batch:
        pos = batch["position_ids"]
        out["position_ids"] = torch.cat([pos, torch.arange(extra, dtype=pos.dtype, device=pos.device)[None]], 1)
    if "attention_mask" in batch and batch["attention_mask"] is not None:
        out["attention_mask"] = grow(batch["attention_mask"], 1)
    cu = batch["cu_seq_lens_q"]
    cu = torch.cat([cu, cu[-1:] + extra])
    out.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(int(batch["max_length_q"]), extra),
               max_length_k=max(int(batch["max_length_k"]), extra))
    return out
