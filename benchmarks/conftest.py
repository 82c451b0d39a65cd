"""Shared set-up for the benchmark suite: ``pytest benchmarks/ --benchmark-json=RESULTS.json``.

On a CUDA machine every benchmark runs at its full size and times with CUDA events. Without
one the suite runs in CI-sized mode: small shapes on the CPU, Triton kernels through the
Triton interpreter (the figures then only show that every path runs).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module imports triton
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402

from harma_fast.backend import triton_available, triton_interpreting  # noqa: E402

if triton_available() and triton_interpreting():
    from harma_fast.kernels._interpreter import make_bf16_faithful

    make_bf16_faithful()  # the interpreter's own bf16 truncates and multiplies raw bits

logging.getLogger().setLevel(logging.ERROR)
