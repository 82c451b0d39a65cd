"""Launches go to the tensors' GPU: checked on CPU with the CUDA device switch mocked.

Triton launches on the *current* CUDA device. With tensors on ``cuda:1`` and the current
device ``cuda:0``, a launch runs on the wrong GPU with pointers into another one's memory.
"""
import contextlib
import types

import pytest
import torch

pytest.importorskip("triton")
from harma_fast.kernels import _aot, _common  # noqa: E402


class FakeDeviceSwitch:
    """Stands in for ``torch.cuda.device``: keeps the stack of devices entered."""

    def __init__(self):
        self.stack = []

    def __call__(self, device):
        @contextlib.contextmanager
        def entered():
            self.stack.append(torch.device(device))
            try:
                yield
            finally:
                self.stack.pop()
        return entered()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_launch_runs_inside_its_tensors_device(monkeypatch, dtype):
    switch = FakeDeviceSwitch()
    monkeypatch.setattr(_common, "_is_cuda", lambda t: True)  # pretend: these CPU tensors are on a GPU
    monkeypatch.setattr(torch.cuda, "device", switch)
    launches = []

    def stub(kernel):
        name = getattr(kernel, "fn", kernel).__name__

        class Launch:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    tensors = [a for a in args if isinstance(a, torch.Tensor)]
                    launches.append((name, list(switch.stack), {t.device for t in tensors}))
                return launch
        return Launch()
    _aot.run_launchers(dtype, stub)
    assert {name for name, _, _ in launches} >= {"_down_gelu_fwd_kernel", "_gelu_grad_kernel", "_mix_up_fwd_kernel",
                                                 "_mix_up_bwd_kernel", "_mix_up_gates_kernel", "_attn_fwd_kernel",
                                                 "_attn_bwd_kernel", "_loss_rows_kernel", "_loss_grad_kernel",
                                                 "_count_above_kernel"}
    for name, stack, devices in launches:
        assert stack, f"{name} launched outside torch.cuda.device(<its tensors' device>)"
        assert {stack[-1]} == devices, f"{name} launched in {stack[-1]} with tensors on {devices}"


def test_no_device_switch_for_cpu_tensors():
    assert isinstance(_common.on_device(torch.zeros(1)), contextlib.nullcontext)


def test_trainer_makes_an_explicit_gpu_current(monkeypatch):
    from harma_fast import train
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train._device(types.SimpleNamespace(device="cuda:1"), local_rank=0) == torch.device("cuda:1")
    assert calls == [torch.device("cuda:1")]
    calls.clear()
    # "cuda" without an index: each torchrun process its own GPU, as under auto (set_device("cuda") raised)
    assert train._device(types.SimpleNamespace(device="cuda"), local_rank=1) == torch.device("cuda:1")
    assert calls == [torch.device("cuda:1")]
    calls.clear()
    assert train._device(types.SimpleNamespace(device="cpu"), local_rank=0) == torch.device("cpu")
    assert calls == []
