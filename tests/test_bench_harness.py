"""The GPU session's plan and the benchmark harness, checked without a GPU."""
import gc
import json
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from benchmarks import _harness

ROOT = Path(__file__).resolve().parents[1]


def _all_suite():
    """The pytest arguments of ``gpu_session.sh all``'s suite (its ALL_SUITE array)."""
    text = (ROOT / "benchmarks" / "gpu_session.sh").read_text()
    body = re.search(r"^ALL_SUITE=\((.*?)^\)", text, re.S | re.M).group(1)
    return [w for line in body.splitlines() for w in line.split("#")[0].split()]


def _collect(args):
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_all_runs_every_benchmark_and_every_compile_after_the_headline_figures():
    # in file order the two torch.compile builds of the ViT-B-32 step (a minute or more each)
    # ran before the loss, recall and encode benchmarks, and the attention-core choice after a
    # dozen compiled adapters: the suite's 290 s bound would cut the headline figures
    planned = _collect(_all_suite())
    suite = _collect(["benchmarks/", "--ignore=benchmarks/bench_onnx.py"])
    assert len(planned) == len(set(planned)) and set(planned) == set(suite)  # all of it, once
    compiled = [i for i, item in enumerate(planned) if "compiled" in item]
    eager = [i for i, item in enumerate(planned) if "compiled" not in item]
    assert compiled and max(eager) < min(compiled), [planned[i] for i in compiled[:1]]
    first = planned[min(compiled)]  # the headline case first: bf16 (batch 512 on the GPU)
    assert first.startswith("benchmarks/bench_train_step.py::test_train_step_compiled[") and "bf16" in first


class _Blob:
    live = weakref.WeakSet()

    def __init__(self):
        _Blob.live.add(self)
        self.me = self  # a reference cycle: freed by the collector, not when the last name goes


def test_peak_memory_total_leaves_out_an_earlier_benchmarks_garbage(monkeypatch):
    # the fast path's patched model lives on in a reference cycle after its test: the next
    # benchmark's total peak (the train step's 11.5 GiB target) counted its weights
    allocated = lambda: len(_Blob.live) * 2 ** 20  # noqa: E731 - one MiB per live blob
    peak = [0]
    monkeypatch.setattr(_harness, "ON_GPU", True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: allocated())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: peak.__setitem__(0, allocated()))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: max(peak[0], allocated()))
    was_enabled = gc.isenabled()
    gc.disable()  # as between two benchmarks: the collector has not happened to run yet
    try:
        _Blob()  # the earlier benchmark's model, now garbage
        kept = []
        total, extra = _harness.peak_memory_mb(lambda: kept.append(_Blob()))
    finally:
        if was_enabled:
            gc.enable()
    assert (total, extra) == (1.0, 1.0)


def _session(tmp_path, *args, nvidia_smi=None):
    """Run gpu_session.sh with this interpreter first on PATH (and a stand-in nvidia-smi)."""
    import os
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tools = {"python3": f'exec "{sys.executable}" "$@"'}  # a wrapper: a symlink loses a venv's packages
    if nvidia_smi is not None:
        tools["nvidia-smi"] = nvidia_smi
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens where torch sees no GPU")
def test_a_gpu_torch_cannot_use_stops_the_session_instead_of_reporting_cpu_figures(tmp_path):
    # nvidia-smi alone decided "GPU": with a torch that could not use it, the CUDA tests all
    # skipped and the suite timed CI-sized CPU runs, a clean-looking session with no GPU figure
    out = _session(tmp_path, "tests", nvidia_smi='echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"')
    assert out.returncode == 3, out.stdout[-2000:] + out.stderr[-2000:]
    versions = (tmp_path / "out" / "versions.txt").read_text()
    assert "torch.cuda.is_available() is False" in versions and "H100" in versions
    assert not (tmp_path / "out" / "cuda_tests.log").exists()


def test_help_and_a_typo_cost_no_install_or_import(tmp_path):
    # both went through the wheel install and the version imports first (seconds of device time)
    for name, rc in (("--help", 0), ("nonsense", 2)):
        where = tmp_path / name.strip("-")
        where.mkdir()
        out = _session(where, name)
        assert out.returncode == rc and out.stdout.startswith("usage: gpu_session.sh all|tests")
        assert not (where / "out").exists()


def test_each_benchmark_is_on_disk_as_it_finishes(tmp_path, monkeypatch):
    # pytest-benchmark writes RESULTS.json at the session's end only: a crashed suite (a
    # segfault in a late compile) lost every figure measured before it
    records = tmp_path / "records.jsonl"
    monkeypatch.setenv("HARMA_BENCH_RECORDS", str(records))
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "benchmarks/bench_loss.py::test_loss[x] (call)")

    class Bench:
        extra_info = {}

        def pedantic(self, fn, **kwargs):
            fn()
    for provider in ("reference", "triton"):
        _harness.measure(Bench(), lambda: None, provider=provider, mode="full", items=4, item_name="pairs", op="loss")
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    assert [(r["test"], r["provider"], r["op"]) for r in lines] == [
        ("benchmarks/bench_loss.py::test_loss[x]", p, "loss") for p in ("reference", "triton")]
    assert all(r["pairs_per_s"] > 0 and "median_ms" in r for r in lines)
