"""The GPU session's plan and the benchmark harness, checked without a GPU."""
import gc
import weakref

import pytest
import torch

from benchmarks import _harness

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
