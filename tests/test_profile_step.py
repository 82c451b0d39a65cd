"""The step profiler the GPU session runs (benchmarks/profile_step.py): its arithmetic on made-up
kernel timelines, and a CPU rehearsal of the whole command."""
import json
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from benchmarks import profile_step
from benchmarks._step import parse_provider


def _event(name, start, end, device=DeviceType.CUDA):
    return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(start=start, end=end),
                           self_cpu_time_total=end - start)


def test_busy_union_merges_overlaps_and_keeps_gaps():
    assert profile_step._busy_union_us([]) == 0.0
    assert profile_step._busy_union_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17.0


def test_summarize_counts_kernels_short_ones_idle_time_and_syncs():
    events = [
        _event("gemm", 0, 40), _event("gemm", 50, 90),            # two steps' long kernels
        _event("tiny", 40, 43), _event("tiny", 95, 98),           # launch-bound kernels
        _event("Memcpy DtoH (Device -> Pageable)", 98, 100),      # a copy: busy time, not a kernel
        _event("cudaStreamSynchronize", 0, 1, DeviceType.CPU),
        _event("cudaLaunchKernel", 0, 1, DeviceType.CPU),
    ]
    s = profile_step.summarize(events, steps=2)
    assert s["kernels_per_step"] == 2 and s["short_kernels_per_step"] == 1
    assert s["dtoh_copies_per_step"] == 0.5 and s["host_syncs_per_step"] == 0.5
    # window 0..100 µs, busy 0..43, 50..90, 95..100 = 88 µs
    assert s["idle_fraction"] == pytest.approx(0.12)
    assert s["kernel_ms_per_step"] == pytest.approx((40 + 40 + 3 + 3) / 2 / 1e3)
    assert s["top_kernels"][0] == {"name": "gemm", "calls_per_step": 1.0, "ms_per_step": 0.04, "mean_us": 40.0}


def test_provider_names_are_checked():
    assert parse_provider("fused-compiled:reduce-overhead") == ("fused-compiled", "reduce-overhead")
    assert parse_provider("reference") == ("reference", None)
    for bad in ("fast", "fused:reduce-overhead", "reference:default"):
        with pytest.raises(ValueError, match="unknown provider"):
            parse_provider(bad)


def test_cpu_rehearsal_writes_its_report(tmp_path, capsys):
    # the reference step of HarMA-Tiny runs in well under a second on the CPU; the fused one
    # (Triton interpreter) is left to the benchmark suite's CI-sized run
    rc = profile_step.main(["--providers", "reference", "--steps", "1", "--warmup", "0", "--batch", "2",
                            "--out", str(tmp_path)])
    assert rc == 0
    (result,) = json.loads((tmp_path / "profile.json").read_text())
    assert result["provider"] == "reference" and result["pairs_per_s"] > 0
    assert result["fused_adamw"] is False  # CPU parameters: the foreach AdamW (on the GPU, fused: reported)
    assert result["top_host_ops"] and "reference" in (tmp_path / "profile.md").read_text()


def test_bad_arguments_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        profile_step.main(["--providers", "fused-compiled:x,nonsense", "--out", str(tmp_path / "o")])
    assert "unknown provider 'nonsense'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_time_bound_keeps_the_finished_providers_table(tmp_path, capsys, monkeypatch):
    # gpu_session.sh interrupts the profile at its bound with SIGINT: profile.md was written, and
    # the table printed into profile.log, only after the last provider, so a bound hit while
    # compiling left a traceback and raw JSON; the providers that finished come back as a table
    def fake(provider, *args):
        if provider == "fused":
            raise KeyboardInterrupt
        return {"provider": provider, "step_ms": 12.0, "host_ops_per_step": 345.0, "top_host_ops": []}
    monkeypatch.setattr(profile_step, "profile_provider", fake)
    with pytest.raises(KeyboardInterrupt):
        profile_step.main(["--providers", "reference,fused", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    for text in (printed, (tmp_path / "profile.md").read_text()):
        assert "- reference: 12 ms/step" in text and "| fused | not finished: the time bound interrupted it" in text
    assert [r["provider"] for r in json.loads((tmp_path / "profile.json").read_text())] == ["reference", "fused"]
