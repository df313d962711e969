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


def heap_is_retained() -> bool:
    """Whether ``retain_freed_memory`` is in effect in this process."""
    return _done


# Bytes of fresh heap a training pass touches per (token x layer x hidden unit): activations kept for backward
# and transient buffers. Calibrated low on SmolLM2-135M LoRA (the first 1328-token pass grew the heap in use by
# ~0.6 GiB, ~28 bytes per unit), so that touching this much in advance never raises the run's peak memory.
PREFAULT_BYTES_PER_UNIT = 24
_CHUNK = 64 << 20


def prefault_heap(nbytes: int) -> int:
    """Touch ``nbytes`` of new heap memory and free it again, so the first training step finds it mapped; returns
    the bytes touched (0 where freed memory is not kept, see ``retain_freed_memory``).

    The first step of a run allocates its activations from fresh memory, and every page of it faults in as the
    step first writes it. Measured on this project's VM (SmolLM2-135M LoRA, benchmark data): those faults, taken
    one by one from inside the step's parallel ops, made the first step ~1 s slower than touching the same memory
    in bulk beforehand (1 GiB in 0.36 s). The memory is touched in 64 MiB blocks from glibc's main heap, which
    keeps it after the free (M_TRIM_THRESHOLD), and the step's allocations are carved from it."""
    if not _done or nbytes <= 0:
        return 0
    import torch

    blocks = []
    try:
        for _ in range(-(-nbytes // _CHUNK)):
            blocks.append(torch.empty(_CHUNK, dtype=torch.uint8).fill_(0))
    except RuntimeError:  # out of memory: stop touching, the step itself will tell
        pass
    touched = len(blocks) * _CHUNK
    del blocks
    return touched


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
    In a LoRA run most weights are replaced (bf16 copies, see sftlab.accel.setup), but the frozen
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
