import os

# Kernels run through the Triton interpreter on CPU; this must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
# Never reach for a hub, even by accident.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import logging  # noqa: E402

from harma_fast.backend import triton_available, triton_interpreting  # noqa: E402

if triton_available() and triton_interpreting():
    from harma_fast.kernels._interpreter import prepare

    prepare()  # the interpreter's own bf16 truncates and multiplies raw bits; scalars as indices under NumPy 2.5

import pytest  # noqa: E402
import torch  # noqa: E402

logging.getLogger().setLevel(logging.ERROR)  # open_clip warns on every random-initialised model
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def gen():
    """A seeded generator: fresh random inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def trained_demo(tmp_path_factory):
    """One demo run exactly as ``harma-fast demo`` trains (its step budget, no time cap: the same
    steps on any machine), shared by the demo and search tests."""
    from harma_fast.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return run_demo(str(out), minutes=None, progress=False, print_fn=lambda *a, **k: None)


@pytest.fixture
def no_model(monkeypatch):
    """Building a model means the command got past its checks: make that fail loudly."""
    import harma_fast
    import harma_fast.models

    def boom(*args, **kwargs):
        raise AssertionError("the command started work (built a model) before checking its inputs")
    monkeypatch.setattr(harma_fast, "create_model", boom, raising=False)
    monkeypatch.setattr(harma_fast.models, "create_model", boom)
