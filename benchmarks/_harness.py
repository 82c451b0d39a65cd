"""Timing and memory measurement shared by every benchmark.

``measure`` warms up, times the callable with device events (CUDA) or the wall clock (CPU),
records the median and the interquartile spread, the peak device memory of one call (total,
and extra beyond what was allocated before it), and the throughput, into pytest-benchmark's
``extra_info`` (which lands in the JSON that ``python -m benchmarks.report`` reads).
pytest-benchmark's own table times one more call, followed by a device synchronisation.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time
from typing import Callable, Optional, Tuple

import torch

ON_GPU = torch.cuda.is_available()
FULL = ON_GPU or os.environ.get("HARMA_BENCH_FULL") == "1"
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def prepare_environment() -> None:
    """Set up what every benchmark entry point needs before a kernel module imports Triton:
    without CUDA, Triton runs through its interpreter (CI-sized mode); no hub is ever called."""
    if not ON_GPU:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from harma_fast.backend import triton_available, triton_interpreting

    if triton_available() and triton_interpreting():
        from harma_fast.kernels._interpreter import prepare

        prepare()  # the interpreter's own bf16 truncates and multiplies raw bits; scalars as indices under NumPy 2.5


def sizes(full, small):
    """The benchmark's full sizes on a GPU, its CI sizes elsewhere."""
    return full if FULL else small


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


def _time_once(fn: Callable[[], object]) -> float:
    if ON_GPU:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peak_memory_mb(fn: Callable[[], object]) -> Tuple[Optional[float], Optional[float]]:
    """``(total, extra)`` MiB at the peak of one call: all device memory allocated then (weights,
    inputs, caches: what must fit the GPU, as the train step's target counts it), and what the
    call adds beyond what was allocated before it (what the loss's target compares)."""
    if not ON_GPU:
        return None, None
    # an earlier benchmark's model can outlive its test in a reference cycle (the fast path's
    # patched ViT-B-32 does) until the collector runs: its weights would count in this call's total
    gc.collect()
    sync()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated()
    return peak / 2 ** 20, (peak - base) / 2 ** 20


def measure(benchmark, fn: Callable[[], object], *, provider: str, mode: str, items: Optional[int] = None,
            item_name: str = "items", warmup: Optional[int] = None, reps: Optional[int] = None, **info) -> dict:
    # CI-sized mode only shows that every path runs: one warm-up, one timed call
    warmup = warmup if warmup is not None else (3 if ON_GPU else 1)
    for _ in range(warmup):
        fn()
    sync()
    reps = reps or (30 if ON_GPU else 1)
    times = sorted(_time_once(fn) for _ in range(reps))
    median = statistics.median(times)
    q1, q3 = times[len(times) // 4], times[(3 * len(times)) // 4]
    total, extra = peak_memory_mb(fn)
    record = {"provider": provider, "mode": mode, "median_ms": median, "q1_ms": q1, "q3_ms": q3,
              "peak_mem_mb": total, "extra_mem_mb": extra, "device": device_name(), **info}
    if items:
        record[f"{item_name}_per_s"] = items / (median / 1e3)
    benchmark.extra_info.update(record)
    records = os.environ.get("HARMA_BENCH_RECORDS")
    if records:  # one line now: pytest-benchmark writes its JSON only at the session's end, which a
        # crashed process (a segfault in a compile, a CUDA abort) never reaches (gpu_session.sh)
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(records, "a") as f:
            f.write(json.dumps({"test": test, **record}) + "\n")

    def timed():
        fn()
        sync()
    # one call for pytest-benchmark's own table: the figures are the device-event times above
    # (its statistics would time every workload a second time, device time a GPU session lacks)
    benchmark.pedantic(timed, rounds=1, iterations=1, warmup_rounds=0)
    return record


def device_name() -> str:
    if ON_GPU:
        return torch.cuda.get_device_name()
    return "cpu (CI-sized; Triton via interpreter)"


def cpu_description() -> str:
    """CPU model, cores and the vector extensions ONNX Runtime's kernels pick by: int8 speed in
    particular differs severalfold between a CPU with AVX2/VNNI and one without."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    extensions = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    vnni = "" if {"avx512_vnni", "avx_vnni"} & flags else ", no VNNI"  # int8 dot products in one instruction
    return f"{model}, {os.cpu_count()} cores, {'+'.join(extensions) or 'no AVX2'}{vnni}"
