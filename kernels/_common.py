"""Shared launcher helpers for the Triton kernels."""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching PyTorch's matmul for this dtype.

    fp32 GEMMs in PyTorch are IEEE unless the user allowed TF32; the kernels follow the same
    switch so that "fp32" means the same accuracy on both paths.
    """
    if dtype == torch.float32 and not matmul_allows_tf32():
        return "ieee"
    return "tf32"


def matmul_allows_tf32() -> bool:
    """Whether PyTorch's fp32 matmuls may use TF32, read through the API the user can have set.

    Since torch 2.9, reading the legacy ``allow_tf32`` after ``fp32_precision = "tf32"`` was set
    raises ("mix of the legacy and new APIs"); the new getter resolves both ways of setting it
    (the legacy setter, ``set_float32_matmul_precision`` and the global ``fp32_precision``).
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch < 2.9: only the legacy flag exists
        return bool(matmul.allow_tf32)
    return precision == "tf32"


@contextlib.contextmanager
def fp32_matmul(tf32: bool):
    """PyTorch's fp32 matmul precision (which the kernels follow) set to TF32 or IEEE, then restored."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9 (the legacy flag cannot be mixed with it)
        saved, matmul.fp32_precision = matmul.fp32_precision, "tf32" if tf32 else "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:
        saved, matmul.allow_tf32 = matmul.allow_tf32, tf32
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


def on_device(t: torch.Tensor):
    """Context in which a Triton launch runs on ``t``'s GPU.

    Triton launches on the *current* CUDA device; tensors on ``cuda:1`` while the current
    device is ``cuda:0`` would run there with pointers into another GPU's memory.
    """
    if _is_cuda(t):
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _is_cuda(t: torch.Tensor) -> bool:  # one place to decide, which CPU tests can stand in for
    return t.is_cuda


def check_inputs(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: tensors are on different devices {sorted(map(str, devices))}")
    for t in tensors:
        if t is not None and t.dtype not in _TL_DTYPES and t.is_floating_point():
            raise TypeError(f"{op}: unsupported dtype {t.dtype} (float32, bfloat16, float16)")


def pow2(n: int, lo: int = 16, hi: int = 1 << 30) -> int:
    """Next power of two of ``n``, clamped to [lo, hi] (tl.arange and tl.dot want powers of two >= 16)."""
    return max(lo, min(hi, triton.next_power_of_2(max(1, int(n)))))


@triton.jit
def score_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_PRECISION: tl.constexpr):
    """S = A[rows] · B[cols]ᵀ in fp32, a K-loop over D (the loss and the rank count score alike)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        a = tl.load(a_ptr + rows[:, None] * stride_a + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_b + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION)
    return acc
