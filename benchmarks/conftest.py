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

logging.getLogger().setLevel(logging.ERROR)
