"""Profile whole training steps: what stands between the step and the hardware.

    python -m benchmarks.profile_step [--model ViT-B-32] [--batch 512] [--precision bf16]
        [--providers reference,fused,fused-compiled] [--steps 3] [--out DIR] [--trace PROVIDER]

For each provider (benchmarks/_step.py) it warms up, times steps with CUDA events, then records
``--steps`` steps with ``torch.profiler`` and reports per step: GPU kernels launched, kernels
shorter than 5 µs (launch-bound work), the time the GPU sat idle between kernels (the share of
the profiled window no kernel or copy covered), host synchronisations (``cuda*Synchronize``
calls and device-to-host copies), peak memory and the ten kernels that took longest.
Results go to ``DIR/profile.json`` and ``DIR/profile.md`` (and a gzipped Chrome trace of one
provider with ``--trace``).

Without CUDA it profiles the CI-sized step (HarMA-Tiny, batch 4) on the CPU: host operators
only, no kernel or idle figures — a rehearsal that the script and its report work.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks._harness import ON_GPU, prepare_environment, sync

prepare_environment()  # before harma_fast's kernels import triton
from benchmarks._step import make_train_step, parse_provider  # noqa: E402

SHORT_US = 5.0  # a kernel this short costs about as much to launch as to run


def _busy_union_us(intervals: List[tuple]) -> float:
    """Length of the union of ``(start, end)`` intervals (µs): time at least one kernel/copy ran."""
    busy, cur_start, cur_end = 0.0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                busy += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    return busy + ((cur_end - cur_start) if cur_end is not None else 0.0)


def summarize(events, steps: int) -> Dict:
    """Per-step kernel statistics from a profiler's event list (``prof.events()``)."""
    device = [e for e in events if e.device_type == DeviceType.CUDA]
    host = [e for e in events if e.device_type == DeviceType.CPU]
    syncs = sum(1 for e in host if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                "cudaEventSynchronize"))
    if not device:
        top = sorted(((e.name, e.self_cpu_time_total) for e in host), key=lambda t: -t[1])
        return {"host_ops_per_step": len(host) / steps, "host_syncs_per_step": syncs / steps,
                "top_host_ops": _top(top, steps)}
    kernels = [e for e in device if not e.name.startswith(("Memcpy", "Memset"))]
    dtoh = sum(1 for e in device if e.name.startswith("Memcpy DtoH"))
    intervals = [(e.time_range.start, e.time_range.end) for e in device]
    window = max(end for _, end in intervals) - min(start for start, _ in intervals)
    busy = _busy_union_us(intervals)
    durations = [(e.name, e.time_range.end - e.time_range.start) for e in kernels]
    return {
        "kernels_per_step": len(kernels) / steps,
        "short_kernels_per_step": sum(1 for _, d in durations if d < SHORT_US) / steps,
        "kernel_ms_per_step": sum(d for _, d in durations) / steps / 1e3,
        "device_window_ms_per_step": window / steps / 1e3,
        "idle_fraction": 1.0 - busy / window if window > 0 else 0.0,
        "host_syncs_per_step": syncs / steps,
        "dtoh_copies_per_step": dtoh / steps,
        "top_kernels": _top(durations, steps),
    }


def _top(named_us, steps: int, n: int = 10) -> List[Dict]:
    totals: Dict[str, List[float]] = {}
    for name, us in named_us:
        totals.setdefault(name, []).append(us)
    rows = sorted(totals.items(), key=lambda kv: -sum(kv[1]))[:n]
    return [{"name": name[:120], "calls_per_step": len(us) / steps, "ms_per_step": sum(us) / steps / 1e3,
             "mean_us": sum(us) / len(us)} for name, us in rows]


def profile_provider(provider: str, batch: int, precision: str, model: str, steps: int, warmup: int,
                     trace: Path = None) -> Dict:
    device = torch.device("cuda" if ON_GPU else "cpu")
    t0 = time.perf_counter()
    step = make_train_step(provider, batch, precision, model, device)
    for _ in range(warmup):  # compiles, autotunes, fills caches
        step()
    sync()
    setup_s = time.perf_counter() - t0
    times = []
    for _ in range(max(steps, 5) if ON_GPU else 1):
        t = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    if ON_GPU:
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_GPU else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    step_ms = statistics.median(times)
    out = {"provider": provider, "batch": batch, "precision": precision, "model": model,
           "fused_adamw": getattr(step, "fused_adamw", None), "setup_s": setup_s, "step_ms": step_ms,
           "pairs_per_s": batch / (step_ms / 1e3),
           "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if ON_GPU else None,
           **summarize(prof.events(), steps)}
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return out


def markdown(results: List[Dict]) -> str:
    lines = []
    if any("kernels_per_step" in r for r in results):
        lines += ["| provider | step ms | pairs/s | kernels/step | < 5 µs | kernel ms | idle | syncs | DtoH | peak GiB | "
                  "fused AdamW |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['provider']} | failed: {r['error']} |")
        elif "interrupted_after_s" in r:
            lines.append(f"| {r['provider']} | not finished: the time bound interrupted it after "
                         f"{r['interrupted_after_s']:.0f} s (compiling, warming up or profiling) |")
        elif "kernels_per_step" in r:
            lines.append(f"| {r['provider']} | {r['step_ms']:.1f} | {r['pairs_per_s']:,.0f} | "
                         f"{r['kernels_per_step']:.0f} | {r['short_kernels_per_step']:.0f} | "
                         f"{r['kernel_ms_per_step']:.1f} | {100 * r['idle_fraction']:.1f}% | "
                         f"{r['host_syncs_per_step']:.1f} | {r['dtoh_copies_per_step']:.1f} | {r['peak_mem_gib']:.2f} | "
                         f"{'yes' if r.get('fused_adamw') else 'no'} |")
        else:
            lines.append(f"- {r['provider']}: {r['step_ms']:.0f} ms/step on the CPU, "
                         f"{r['host_ops_per_step']:.0f} host ops/step (no CUDA: no kernel figures)")
    for r in results:
        top = r.get("top_kernels") or r.get("top_host_ops") or []
        if top:
            lines += ["", f"**{r['provider']}**, longest per step:", "",
                      "| ms/step | calls | mean µs | name |", "|---|---|---|---|"]
            lines += [f"| {t['ms_per_step']:.2f} | {t['calls_per_step']:.0f} | {t['mean_us']:.1f} | "
                      f"`{t['name']}` |" for t in top]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32" if ON_GPU else "HarMA-Tiny")
    ap.add_argument("--batch", type=int, default=512 if ON_GPU else 4)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--providers", default="reference,fused,fused-compiled",
                    help="comma-separated: reference, fused, fused-compiled[:torch.compile mode]")
    ap.add_argument("--steps", type=int, default=3, help="steps recorded by the profiler")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("profile_out"))
    ap.add_argument("--trace", default=None, help="write PROVIDER's Chrome trace as DIR/trace.json.gz")
    args = ap.parse_args(argv)
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    try:
        for p in providers:
            parse_provider(p)
        if args.batch < 1 or args.steps < 1 or args.warmup < 0:
            raise ValueError("--batch and --steps must be at least 1, --warmup at least 0")
    except ValueError as err:
        ap.error(str(err))
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        _profile_each(providers, args, results)
    finally:
        # also when the session's bound interrupts (SIGINT): the table of the providers that
        # finished is printed into profile.log, what the closing note reads back (gpu_session.sh
        # 'all' drops profile.md for the 8-file limit), instead of a traceback alone
        (args.out / "profile.json").write_text(json.dumps(results, indent=1))
        report = markdown(results)
        (args.out / "profile.md").write_text(report)
        print(report, flush=True)
    return 1 if any("error" in r for r in results) else 0


def _profile_each(providers, args, results) -> None:
    for provider in providers:
        if provider.startswith("fused-compiled") and not ON_GPU:
            print(f"{provider}: skipped (torch.compile is only profiled on the GPU)", file=sys.stderr)
            continue
        print(f"profiling {provider}: {args.model}, batch {args.batch}, {args.precision} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            results.append(profile_provider(provider, args.batch, args.precision, args.model, args.steps,
                                            args.warmup, args.out / "trace.json.gz" if provider == args.trace else None))
        except Exception as err:  # noqa: BLE001 - one provider failing must not lose the others' figures
            results.append({"provider": provider, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"})
        except KeyboardInterrupt:  # the session's time bound: say which provider it cut, and when
            results.append({"provider": provider, "interrupted_after_s": round(time.perf_counter() - started, 1)})
            raise
        finally:
            gc.collect()  # the fused model lives on in a reference cycle: not in the next provider's peak
            if ON_GPU:
                torch.cuda.empty_cache()
        (args.out / "profile.json").write_text(json.dumps(results, indent=1))  # after each: a timeout keeps the rest


if __name__ == "__main__":
    sys.exit(main())
