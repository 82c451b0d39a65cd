"""Shared set-up for the benchmark suite: ``pytest benchmarks/ --benchmark-json=RESULTS.json``.

On a CUDA machine every benchmark runs at its full size and times with CUDA events. Without
one the suite runs in CI-sized mode: small shapes on the CPU, Triton kernels through the
Triton interpreter (the figures then only show that every path runs).
"""
import logging

from benchmarks._harness import prepare_environment

prepare_environment()  # before any kernel module imports triton
logging.getLogger().setLevel(logging.ERROR)
