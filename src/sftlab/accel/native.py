"""sftlab's native CPU kernels (``attention_cpu.c``, ``elementwise_cpu.c``): built on first use with the system's
C compiler, cached.

Why compile at run time rather than ship a wheel: the kernels are specialised to the CPU (``-march=native``,
AVX-512) and, for attention, to the model's head dimension; each builds in about a second, and where one cannot be
built (no compiler, no AVX-512, not Linux x86-64) training falls back to torch's ops with the same results up to
rounding. The libraries are cached under ``$SFTLAB_CACHE/native`` (default ``~/.cache/sftlab/native``), keyed by
the source, the compiler, its flags and the CPU, and written atomically, so concurrent ranks and later runs reuse
them. They use OpenMP through the process's ``libgomp.so.1``, which is torch's own once torch is loaded, so they
share torch's threads (and ``torch.set_num_threads``).

``SFTLAB_NATIVE=0`` turns them off (torch's ops only), e.g. to compare the two.
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

_HERE = Path(__file__).parent
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-lm")
_libs: dict[tuple, "ctypes.CDLL | None"] = {}
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
    from sftlab.files import default_cache_dir

    return default_cache_dir() / "native"


def _build(source: str, defines: tuple[str, ...] = ()) -> Path:
    """The compiled library for ``source`` (a file next to this module) with ``-D`` ``defines``, built if needed."""
    compiler = shutil.which(os.environ.get("CC", "gcc"))
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    path = _HERE / source
    flags = (*_FLAGS, *(f"-D{d}" for d in defines))
    headers = [h.read_text() for h in sorted(_HERE.glob("*.h"))]  # included by the sources
    key = hashlib.sha256("\0".join((path.read_text(), *headers, compiler, version, *flags,
                                     _cpu_signature())).encode())
    stem = "_".join((path.stem, *(d.split("=")[-1] for d in defines)))
    target = _cache_dir() / f"{stem}_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, str(path), "-o", tmp], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {path.name}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)  # atomic: a concurrent build or a crash never leaves a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _library(source: str, defines: tuple[str, ...], signatures: dict):
    """The loaded library with ``signatures`` ({function: argtypes}, all returning int), or None where native
    kernels are off or this one cannot be built here (warned once per process)."""
    global _warned
    key = (source, defines)
    if key in _libs:
        return _libs[key]
    lib = None
    if enabled() and _cpu_has_avx512():
        try:
            lib = ctypes.CDLL(str(_build(source, defines)))
            for name, argtypes in signatures.items():
                fn = getattr(lib, name)
                fn.restype, fn.argtypes = ctypes.c_int, argtypes
        except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as err:
            if not _warned:
                logger.warning("sftlab: native CPU kernels unavailable, using torch's ops (%s)", err)
                _warned = True
            lib = None
    _libs[key] = lib
    return lib


_ATTENTION_ARGS = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_float, ctypes.POINTER(View),
                   ctypes.c_void_p, ctypes.c_int64]


def attention_backward_kernel(head_dim: int):
    """The attention library for ``head_dim``, or None where it is off or cannot be built here."""
    if head_dim % 16 or not 16 <= head_dim <= 256:
        return None
    return _library("attention_cpu.c", (f"HEAD_DIM={head_dim}",),
                    {"sftlab_attention_forward": _ATTENTION_ARGS, "sftlab_attention_backward": _ATTENTION_ARGS})


_I64, _INT, _PTR, _F32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_ELEMENTWISE_ARGS = {
    "sftlab_swiglu_forward": [_I64, _PTR, _PTR, _PTR, _INT],
    "sftlab_swiglu_backward": [_I64, _PTR, _PTR, _PTR, _PTR, _PTR, _INT],
    "sftlab_rotary": [_I64, _INT, _INT, _INT, _PTR, _INT, _I64, _I64, _PTR, _PTR, _I64, _PTR, _INT, _I64, _I64],
    "sftlab_rms_norm_forward": [_I64, _INT, _PTR, _PTR, _F32, _PTR, _PTR],
    "sftlab_rms_norm_backward": [_I64, _INT, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR],
}


def elementwise_kernels(defines: tuple[str, ...] = ()):
    """The library of gated-MLP, rotary and RMSNorm kernels, or None where it is off or cannot be built here."""
    return _library("elementwise_cpu.c", defines, _ELEMENTWISE_ARGS)



def prepare(head_dim: int | None) -> bool:
    """Build (or load from the cache) every native library a model with this head dimension uses, so the one-time
    compile happens before training rather than inside its first step; True if they all loaded."""
    attention_ok = head_dim is not None and attention_backward_kernel(head_dim) is not None
    return elementwise_kernels() is not None and attention_ok


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def swiglu_forward(lib, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (contiguous tensors of one dtype, bf16 or fp32; the caller checks)."""
    out = torch.empty_like(gate)
    lib.sftlab_swiglu_forward(gate.numel(), gate.data_ptr(), up.data_ptr(), out.data_ptr(),
                              int(gate.dtype == torch.bfloat16))
    return out


def swiglu_backward(lib, gate, up, grad, need_gate: bool, need_up: bool):
    """``(grad * up * silu'(gate), grad * silu(gate))``, None where not needed; all of ``gate``'s dtype."""
    grad_gate = torch.empty_like(gate) if need_gate else None
    grad_up = torch.empty_like(gate) if need_up else None
    lib.sftlab_swiglu_backward(gate.numel(), gate.data_ptr(), up.data_ptr(), grad.data_ptr(), _ptr(grad_gate),
                               _ptr(grad_up), int(gate.dtype == torch.bfloat16))
    return grad_gate, grad_up


def view(t: torch.Tensor, head_dim: int, token_dim: int) -> View:
    return View(t.data_ptr(), t.stride(head_dim), t.stride(token_dim), int(t.dtype == torch.bfloat16), 0)


def attention_forward(lib, cu: torch.Tensor, scale: float, q, k, v, out, lse) -> bool:
    """Fill ``out`` (``(1, N, heads, D)``) and ``lse`` (``(heads, N)`` fp32) with causal attention per example in
    bf16 arithmetic (bf16 products with fp32 accumulation, fp32 softmax); q, k, v as for ``attention_backward``.
    False where this CPU or build has no AMX (nothing written: use torch's kernel)."""
    views = (View * 4)(view(q, 1, 2), view(k, 1, 2), view(v, 1, 2), view(out, 2, 1))
    rc = lib.sftlab_attention_forward(cu.numel() - 1, cu.data_ptr(), q.shape[1], k.shape[1], scale, views,
                                      lse.data_ptr(), lse.stride(0))
    if rc == -1:
        raise MemoryError("sftlab's attention forward kernel could not allocate its buffers")
    return rc == 0


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


def rotary(lib, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, transpose: bool) -> None:
    """``out`` = the rotary embedding of ``x`` (or, ``transpose``, its transposed rotation: the backward).
    ``x`` and ``out``: ``(1, heads, N, D)``, bf16 or fp32, contiguous last dimension; ``cos`` / ``sin``: fp32
    ``(1, 1, N, D)`` with a contiguous last dimension. The caller checks."""
    bf = lambda t: int(t.dtype == torch.bfloat16)  # noqa: E731
    rc = lib.sftlab_rotary(x.shape[2], x.shape[1], x.shape[3], int(transpose), x.data_ptr(), bf(x), x.stride(1),
                           x.stride(2), cos.data_ptr(), sin.data_ptr(), cos.stride(2), out.data_ptr(), bf(out),
                           out.stride(1), out.stride(2))
    if rc != 0:
        raise ValueError(f"rotary kernel: head dimension {x.shape[3]} is not a multiple of 32")


def rms_norm_forward(lib, x2: torch.Tensor, weight: torch.Tensor, eps: float):
    """``(y, rstd)`` of RMSNorm over the rows of the contiguous fp32 ``(rows, H)`` ``x2``."""
    y = torch.empty_like(x2)
    rstd = x2.new_empty((x2.shape[0], 1))
    lib.sftlab_rms_norm_forward(x2.shape[0], x2.shape[1], x2.data_ptr(), weight.data_ptr(), eps, y.data_ptr(),
                                rstd.data_ptr())
    return y, rstd


def rms_norm_backward(lib, x2, weight, rstd, g2, need_x: bool, need_w: bool):
    """``(grad_x, grad_w)`` of RMSNorm (None where not needed); all fp32 and contiguous, rows of H."""
    grad_x = torch.empty_like(x2) if need_x else None
    grad_w = torch.empty_like(weight) if need_w else None
    rc = lib.sftlab_rms_norm_backward(x2.shape[0], x2.shape[1], x2.data_ptr(), weight.data_ptr(), rstd.data_ptr(),
                                      g2.data_ptr(), _ptr(grad_x), _ptr(grad_w))
    if rc != 0:
        raise MemoryError("sftlab's RMSNorm backward kernel could not allocate its buffers")
    return grad_x, grad_w
