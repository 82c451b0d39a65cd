"""Backend selection: which implementation of an op runs.

``"reference"`` is plain PyTorch (the spec, and what ONNX export traces); ``"triton"`` is the
fused kernels of ``harma_fast.kernels``; ``"auto"`` picks Triton for CUDA tensors of the kernels'
dtypes (float32, bfloat16, float16) when Triton is importable and the reference everywhere else
(float64 is the reference's: ``tl.dot`` has no float64). Triton on CPU only works under the Triton
interpreter (``TRITON_INTERPRET=1``), which the test-suite uses; its bfloat16 is made faithful
to the GPU's before the first kernel runs (``harma_fast.kernels._interpreter``).
"""
from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "reference")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


_TRITON = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """Whether ``backend`` resolves to Triton for these tensors (raises if it cannot run)."""
    check_backend(backend)
    if backend == "reference":
        return False
    # Tracing for ONNX (torch.onnx / torch.jit) must see plain ops: always the reference.
    if torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    present = [t for t in tensors if t is not None]
    on_cuda = all(t.is_cuda for t in present)
    if backend == "auto":
        use = on_cuda and triton_available() and all(t.dtype in KERNEL_DTYPES for t in present)
    elif not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); "
                           "use backend='reference' or 'auto' on this machine")
    elif not on_cuda and not triton_interpreting():
        raise RuntimeError("backend='triton' runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1, "
                           "for tests); got CPU tensors: use backend='auto' or 'reference'")
    else:
        use = True
    if use and not _interpreter_ready and triton_interpreting():
        _prepare_interpreter()
    return use


_interpreter_ready = False


@torch.compiler.disable  # patches Triton's interpreter once, outside any graph being traced
def _prepare_interpreter() -> None:
    """The interpreter's own bf16 truncates casts and multiplies raw bits in ``tl.dot`` (garbage
    next to the GPU's), and Triton 3.6's cannot index with a scalar under NumPy 2.5: patched
    once, before a kernel runs through it (idempotent)."""
    global _interpreter_ready
    from .kernels._interpreter import prepare

    prepare()
    _interpreter_ready = True
