"""Keep freed memory inside the process (glibc), so training steps stop paying page faults for it.

glibc's malloc serves large blocks (the threshold adapts, up to 32 MiB) with fresh ``mmap`` calls and hands them
back with ``munmap`` on free. A training step allocates and frees the same large tensors every time (logits
chunks, activations of a long batch, weight casts), so on CPU each step re-faults every page of them: measured
here on SmolLM2-135M LoRA, ~70k minor faults in one log-softmax call and 5-13% of the step time overall. With
``M_MMAP_MAX = 0`` every block comes from the heap, and a high ``M_TRIM_THRESHOLD`` keeps freed heap memory
for the next step. Peak RSS barely moves (the same tensors are alive at the peak); memory freed after the peak
is reused by the process rather than returned to the system.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_done = False


def retain_freed_memory() -> bool:
    """Apply the malloc settings above once per process; False where the C library is not glibc."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has mallopt with these meanings
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _done = ok
    return ok


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (Linux ``/proc/self/maps``; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                # address perms offset dev inode path: a file mapping has an inode and a path
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def own_file_backed_tensors(model) -> int:
    """Copy into process memory the parameters and buffers still backed by the checkpoint's file mapping;
    returns how many.

    transformers maps safetensors files and keeps each file's mapping while any tensor loaded from it lives.
    In a LoRA run most weights are replaced (bf16 copies, see workflow.cpu_training_speedups), but the frozen
    embedding keeps the whole mapping, and every page the load and the conversion touched stays resident: 405 MiB
    of RSS for SmolLM2-135M, next to the 113 MiB embedding that is actually still read. Copying the survivors
    (the same values, bit for bit) lets the mapping go."""
    import torch

    ranges = _file_mapped_ranges()
    if not ranges:
        return 0
    n = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type != "cpu" or t.numel() == 0:
                continue
            ptr = t.data_ptr()
            if any(lo <= ptr < hi for lo, hi in ranges):
                t.data = t.data.clone()
                n += 1
    return n
