"""The public API where only tests used to tread: backend="triton" on CPU under the interpreter."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from harma_fast.backend import triton_interpreting  # noqa: E402
from harma_fast.kernels._interpreter import prepare  # noqa: E402

# A fresh process: this one's conftest has made the interpreter's bf16 faithful already.
BF16_LOSS = """
import torch, harma_fast
from harma_fast.losses import harma_loss_ref
from triton.runtime.interpreter import InterpreterBuilder
assert not getattr(InterpreterBuilder, "_harma_bf16_faithful", False)
g = torch.Generator().manual_seed(0)
img = torch.nn.functional.normalize(torch.randn(24, 32, generator=g, dtype=torch.float64), dim=1)
txt = torch.nn.functional.normalize(torch.randn(24, 32, generator=g, dtype=torch.float64), dim=1)
ids = torch.arange(24) // 2
exact = harma_loss_ref(img, txt, torch.tensor(0.07, dtype=torch.float64), ids).total.item()
torch_bf16 = harma_loss_ref(img.bfloat16(), txt.bfloat16(), torch.tensor(0.07), ids).total.item()
loss = harma_fast.HarMALoss(backend="triton", gather_distributed=False)
got = loss(img.bfloat16(), txt.bfloat16(), ids).total.item()
print(exact, torch_bf16, got)
"""


@pytest.mark.interpreter
def test_triton_backend_under_the_interpreter_is_right_in_bf16_without_test_setup():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", BF16_LOSS], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == 0, run.stderr
    exact, torch_bf16, got = map(float, run.stdout.split())
    # within twice torch's own bf16 error (the raw interpreter was off by 1e13)
    assert abs(got - exact) <= 2 * abs(torch_bf16 - exact) + 1e-3, (exact, torch_bf16, got)



@triton.jit
def _sum_in_blocks(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A loop bounded by a runtime scalar, as every GEMM kernel of harma_fast has."""
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


@pytest.mark.interpreter
@pytest.mark.skipif(not triton_interpreting(), reason="needs TRITON_INTERPRET=1")
def test_an_interpreted_loop_bound_is_an_index_without_numpys_deprecated_conversion():
    # the interpreter holds a scalar as a one-element 1-d array; Triton 3.6 made a loop bound of it
    # with int(array), deprecated since NumPy 1.25 and an error from NumPy 2.5 on (every kernel with
    # a loop failed there); the prepared interpreter squeezes it first, as Triton 3.8's own does
    prepare()
    x, out = torch.arange(10, dtype=torch.float32), torch.zeros(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _sum_in_blocks[(1,)](x, out, x.numel(), BLOCK=4)
    assert out.item() == 45.0


def test_submodules_the_readme_names_are_reachable_after_import_harma_fast():
    # README: harma_fast.fast.enable_fast_path(model), harma_fast.data.transforms.train_transform,
    # harma_fast.distributed.sum_gradients_hook -- after a bare `import harma_fast` each raised
    # AttributeError (module 'harma_fast' has no attribute 'fast')
    code = ("import harma_fast\n"
            "print(harma_fast.fast.enable_fast_path.__name__, harma_fast.distributed.sum_gradients_hook.__name__,"
            " harma_fast.data.transforms.train_transform.__name__)\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["enable_fast_path", "sum_gradients_hook", "train_transform"]
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        __import__("harma_fast").nonexistent


def test_the_api_takes_a_model_wrapped_in_ddp_or_torch_compile(tmp_path):
    # save_adapters(ddp) said "model is not patched"; save_adapters(torch.compile(model)) wrote keys
    # and a backbone fingerprint under '_orig_mod.': a file the plain model refused ("trained on
    # another backbone"). patch(ddp) would add adapters DDP does not synchronise.
    import torch
    import torch.distributed as dist

    import harma_fast
    from harma_fast.checkpoints import adapter_state_dict
    from harma_fast.fast import enable_fast_path
    from helpers import randomize_adapters, tiny_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    try:
        with pytest.raises(RuntimeError, match="patch the model first, then wrap it"):
            harma_fast.patch(torch.nn.parallel.DistributedDataParallel(tiny_model()))
        compiled = torch.compile(tiny_model())
        assert harma_fast.patch(compiled) is compiled and harma_fast.is_patched(compiled._orig_mod)
        assert harma_fast.unpatch(compiled) is compiled and not harma_fast.is_patched(compiled)
        model = randomize_adapters(harma_fast.patch(tiny_model()), seed=2)
        wrappers = {"ddp": torch.nn.parallel.DistributedDataParallel(model), "compiled": torch.compile(model)}
        wrappers["compiled ddp"] = torch.compile(wrappers["ddp"])
        for name, wrapped in wrappers.items():
            assert harma_fast.is_patched(wrapped), name
            assert list(adapter_state_dict(wrapped)) == list(adapter_state_dict(model)), name
            harma_fast.set_backend(wrapped, "reference")
            assert enable_fast_path(wrapped) == 4, name
            path = tmp_path / f"{name}.safetensors"
            harma_fast.save_adapters(wrapped, path)
            plain = harma_fast.load_adapters(tiny_model(), path)
            for key, value in adapter_state_dict(model).items():
                assert torch.equal(adapter_state_dict(plain)[key], value), f"{name}: {key}"
            assert harma_fast.load_adapters(wrapped, path) is wrapped  # back into it, mid-training
        unpatched = torch.nn.parallel.DistributedDataParallel(tiny_model())
        with pytest.raises(RuntimeError, match="patch the model first, then wrap it"):
            harma_fast.load_adapters(unpatched, path)  # would patch it inside DDP
        assert not harma_fast.is_patched(unpatched)
    finally:
        dist.destroy_process_group()


def test_auto_runs_the_reference_for_dtypes_the_kernels_do_not_take(monkeypatch):
    # float64 features or a float64 model on CUDA under backend="auto" went to the Triton kernels
    # (tl.dot has no float64) and raised, where "auto" promises whichever implementation can run
    from types import SimpleNamespace

    import harma_fast.backend as backend

    monkeypatch.setattr(backend, "triton_available", lambda: True)
    cuda = lambda dtype: SimpleNamespace(is_cuda=True, dtype=dtype)  # noqa: E731 - what use_triton reads
    assert backend.use_triton("auto", cuda(torch.float32), cuda(torch.bfloat16), None)
    assert backend.use_triton("auto", cuda(torch.float16))
    assert not backend.use_triton("auto", cuda(torch.float64), cuda(torch.float64))
    assert not backend.use_triton("auto", cuda(torch.bfloat16), cuda(torch.float64))  # a float64 weight
    assert not backend.use_triton("auto", cuda(torch.int64))
