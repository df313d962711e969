"""What the CPU acceleration layer is asked to do (`sftlab.accel.apply`'s options)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AccelOptions:
    """Options of `sftlab.accel.apply`; the workflow fills them from the run's configuration.

    ``pad_tokens_to_multiple_of``: each padding-free forward pass under sftlab's per-example attention gets one
    padding segment (no labels, attended by nothing else) up to a multiple of this many tokens, so matmul shapes
    repeat from step to step (oneDNN builds a kernel per shape: ~5 ms and ~1.7 MB each, measured on an AMD EPYC
    Zen 4 VM). 0 or 1: no padding.
    ``store_frozen_in_bf16``: store frozen linear weights in bf16 (right for LoRA under bf16 autocast, which rounds
    them to bf16 at every matmul anyway; not for freeze, which writes the frozen layers back exactly as loaded).
    """

    pad_tokens_to_multiple_of: int = 64
    store_frozen_in_bf16: bool = False
