"""Prepare the Triton interpreter for tests and CPU benchmarks: its bfloat16 made faithful to the GPU,
its scalars usable as indices under NumPy 2.5.

``harma_fast.backend.use_triton`` applies it (``prepare()``) before the first kernel runs under
``TRITON_INTERPRET=1``, so the public API is right there without calling it.

The interpreter (numpy) keeps bf16 values as raw uint16: its fp32→bf16 cast truncates where
the GPU rounds to nearest even, and ``tl.dot`` multiplies the raw bits. This patch rounds
like the hardware (through torch) and feeds dots the exact fp32 values of bf16 operands —
a bf16 tensor-core product with fp32 accumulation is exactly that, so the kernels' own code
is what the tests run. Elementwise arithmetic directly on bf16 stays unsupported: the kernels
upcast to fp32 before any math.
"""
from __future__ import annotations

import numpy as np
import torch


def prepare() -> None:
    """Everything the interpreter needs before a kernel runs through it (process-wide; idempotent)."""
    make_bf16_faithful()
    make_scalar_index_numpy_proof()


def make_scalar_index_numpy_proof() -> None:
    """Let an interpreted scalar be used as an index (``range(0, K, BLOCK)``) under any NumPy.

    The interpreter keeps a scalar as a one-element 1-d array; Triton 3.6 turns it into a Python
    int with ``int(array)``, which NumPy 2.5 refuses ("only 0-dimensional arrays can be converted
    to Python scalars": the deprecation of NumPy 1.25 carried out), so every kernel with a loop
    failed under the interpreter. Triton 3.8 squeezes the array first; this does the same on
    every Triton (a no-op where it already does).
    """
    from triton.runtime import interpreter as interp

    patch_tensor = getattr(interp, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_harma_scalar_index", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        # set after Triton's own: the scope restores in reverse order, so both are undone
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._harma_scalar_index = True
    interp._patch_lang_tensor = _patch_lang_tensor


def make_bf16_faithful() -> None:
    """Patch the interpreter's bf16 cast and dot (process-wide; idempotent)."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_harma_bf16_faithful", False):
        return
    cast, dot = builder.cast_impl, builder.create_dot

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32)).to(torch.bfloat16)
            return interp.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
        return cast(self, src, dst_type)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16:
            a = cast(self, a, tl.float32)
        if b.dtype.scalar == tl.bfloat16:
            b = cast(self, b, tl.float32)
        return dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    builder.cast_impl, builder.create_dot = cast_impl, create_dot
    builder._harma_bf16_faithful = True
