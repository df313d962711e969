"""Packing of tokenized examples into fixed-capacity rows.

Packing several short examples into one row removes most padding. Each example keeps its own position ids
(restarting at 0) and its length is recorded in ``seq_lens``, so the collator can keep attention and the
shifted targets inside each example.
"""

from __future__ import annotations

import bisect


def bfd_pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing of example indices.

    Examples are placed longest first (ties: lower index first); each goes into the open bin with the least
    remaining room that still fits it (ties: the oldest bin), or into a new bin. Deterministic; every index
    appears exactly once. Bins are returned in creation order, indices within a bin in placement order.

    Raises ValueError for a non-positive capacity, a negative length, or a length above ``capacity``
    (the tokenizer truncates before packing, so that is a caller bug, not a data problem).
    """
    if capacity < 1:
        raise ValueError(f"packing capacity must be >= 1, got {capacity}")
    for i, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"example {i} has negative length {n}")
        if n > capacity:
            raise ValueError(f"example {i} has length {n} > packing capacity {capacity}; truncate before packing")

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    # Open bins as (remaining room, bin id), kept sorted so the best fit is one bisect away.
    room: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        pos = bisect.bisect_left(room, (n, -1))
        if pos < len(room):
            left, b = room.pop(pos)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            # Full bins stay listed: a zero-length example still fits there.
            bisect.insort(room, (capacity - n, len(bins) - 1))
    return bins


def pack_examples(examples: list[dict], capacity: int) -> list[dict]:
    """Pack tokenized examples ``{"input_ids", "labels"}`` into rows of at most ``capacity`` tokens.

    Each pack is ``{"input_ids", "labels", "position_ids", "seq_lens"}``: the examples' tokens and labels
    concatenated, position ids restarting at 0 for every example, and the examples' lengths in order.
    """
    lengths = []
    for i, ex in enumerate(examples):
        if len(ex["input_ids"]) != len(ex["labels"]):
            raise ValueError(
                f"example {i}: input_ids has {len(ex['input_ids'])} tokens but labels has {len(ex['labels'])}"
            )
        lengths.append(len(ex["input_ids"]))

    packs = []
    for bin_ in bfd_pack(lengths, capacity):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for i in bin_:
            input_ids.extend(examples[i]["input_ids"])
            labels.extend(examples[i]["labels"])
            position_ids.extend(range(lengths[i]))
        packs.append(
            {
                "input_ids": input_ids,
                "labels": labels,
                "position_ids": position_ids,
                "seq_lens": [lengths[i] for i in bin_],
            }
        )
    return packs
