"""sftlab's one native kernel (``attention_cpu.c``): built on first use with the system's C compiler, cached.

Why compile at run time rather than ship a wheel: the kernel is specialised to the CPU (``-march=native``, AVX-512)
and to the model's head dimension, it builds in about a second, and where it cannot be built (no compiler, no
AVX-512, not Linux x86-64) training falls back to torch's kernels with the same results up to rounding order. The
library is cached under ``$SFTLAB_CACHE/native`` (default ``~/.cache/sftlab/native``), keyed by the source, the
compiler, its flags and the CPU, and written atomically, so concurrent ranks and later runs reuse it.

``SFTLAB_NATIVE=0`` turns the kernel off (torch's kernels only), e.g. to compare the two.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention_cpu.c")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm")
_libs: dict[int, "ctypes.CDLL | None"] = {}
_warned = False


class View(ctypes.Structure):
    """A tensor as the kernel reads it: data pointer, head and token strides (elements), bf16 or fp32."""

    _fields_ = [("data", ctypes.c_void_p), ("s_head", ctypes.c_int64), ("s_tok", ctypes.c_int64),
                ("bf16", ctypes.c_int32), ("unused", ctypes.c_int32)]


def enabled() -> bool:
    return os.environ.get("SFTLAB_NATIVE", "1") not in ("0", "false", "no", "off")


def _cpu_has_avx512() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    return False


def _cpu_signature() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    from sftlab.models.bundled import default_cache_dir

    return default_cache_dir() / "native"


def _build(head_dim: int) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    flags = (*_FLAGS, f"-DHEAD_DIM={head_dim}")
    key = hashlib.sha256("\0".join((SOURCE.read_text(), compiler, version, *flags, _cpu_signature())).encode())
    target = _cache_dir() / f"attention_cpu_d{head_dim}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def attention_backward_kernel(head_dim: int):
    """The loaded library for ``head_dim``, or None where the kernel is off or cannot be built here."""
    global _warned
    if head_dim in _libs:
        return _libs[head_dim]
    lib = None
    if enabled() and head_dim % 16 == 0 and 16 <= head_dim <= 256 and _cpu_has_avx512():
        try:
            path = _build(head_dim)
            lib = ctypes.CDLL(str(path))
            fn = lib.sftlab_attention_backward
            fn.restype = ctypes.c_int
            fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float,
                           ctypes.POINTER(View), ctypes.c_void_p, ctypes.c_int64]
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            if not _warned:
                logger.warning("sftlab: native attention kernel unavailable, using torch's (%s)", err)
                _warned = True
            lib = None
    _libs[head_dim] = lib
    return lib


def view(t: torch.Tensor, head_dim: int, token_dim: int) -> View:
    return View(t.data_ptr(), t.stride(head_dim), t.stride(token_dim), int(t.dtype == torch.bfloat16), 0)


def attention_backward(lib, cu: torch.Tensor, scale: float, q, k, v, o, dout, dq, dk, dv, lse) -> None:
    """Fill ``dq``, ``dk``, ``dv`` (``(1, heads, N, D)``) for causal attention per example of one flattened row.

    q, k, v and the gradients are ``(1, heads, N, D)``; ``o`` and ``dout`` are ``(1, N, heads, D)``; ``lse`` is
    ``(heads, N)`` fp32; ``cu`` holds the example boundaries (int64, from 0 to N). Every tensor is bf16 or fp32
    with a contiguous last dimension; the caller checks."""
    views = (View * 8)(view(q, 1, 2), view(k, 1, 2), view(v, 1, 2), view(o, 2, 1), view(dout, 2, 1),
                       view(dq, 1, 2), view(dk, 1, 2), view(dv, 1, 2))
    rc = lib.sftlab_attention_backward(cu.numel() - 1, cu.data_ptr(), q.shape[1], k.shape[1], scale, views,
                                       lse.data_ptr(), lse.stride(0))
    if rc != 0:
        raise MemoryError("sftlab's attention backward kernel could not allocate its buffers")
