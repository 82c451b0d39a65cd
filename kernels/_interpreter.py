"""Make the Triton interpreter's bfloat16 faithful to the GPU, for tests and CPU benchmarks.

``harma_fast.backend.use_triton`` applies it before the first kernel runs under
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
