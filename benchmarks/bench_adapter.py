"""One HarMA adapter at ViT-B-32 shapes: reference (eager) / compiled (torch.compile of the
reference) / triton, forward / backward / full, fp32 and bf16, with peak memory; and the
adapter's attention core, fused SDPA against the whole-sequence Triton kernel.

Issue target (H100, bf16): adapter forward+backward >= 3x the eager reference and >= 1.3x
torch.compile of the reference.
"""
import pytest
import torch

from benchmarks._harness import DEVICE, DTYPES, ON_GPU, measure, sizes
from harma_fast.modules import HarMAAdapter, SharedSubAdapter

N = sizes(512, 1)
TOWERS = {"image": (50, 768, False), "text": (77, 512, True)}  # L, d, has the shared S


def _adapter(tower, provider):
    length, d, shared = TOWERS[tower]
    torch.manual_seed(0)
    s = SharedSubAdapter(128, 64, 8, 0.6) if shared else None
    adapter = HarMAAdapter(d, 128, 8, 0.6, shared=s).to(DEVICE)
    with torch.no_grad():  # a trained adapter: the up-projections are not zero
        for p in adapter.parameters():
            if p.ndim:
                p.normal_(0, p.shape[-1] ** -0.5)
    adapter.set_backend("triton" if provider == "triton" else "reference")
    return adapter, length, d


def _runner(tower, provider, mode, dtype):
    adapter, length, d = _adapter(tower, provider)
    g = torch.Generator(device=DEVICE).manual_seed(1)
    h = torch.randn(N, length, d, device=DEVICE, generator=g, dtype=DTYPES[dtype], requires_grad=mode != "forward")
    x = torch.randn(N, length, d, device=DEVICE, generator=g, dtype=DTYPES[dtype])
    # static shapes: the image cases compiled first must not turn the text case's graph symbolic
    fwd = torch.compile(adapter, dynamic=False) if provider == "compiled" else adapter
    autocast = torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=dtype == "bf16")
    upstream = torch.randn_like(x)

    def forward():
        with autocast:
            return fwd(h, x=x)
    if mode == "forward":
        return forward
    if mode == "full":
        return lambda: forward().backward(upstream)
    # backward alone replays one graph (retain_graph): a compiled graph must not donate its saved
    # buffers to the backward (AOTAutograd's default), or the second backward is refused (seen on
    # the text tower's graph, compiled after the image tower's)
    with torch._functorch.config.patch(donated_buffer=False):
        out = forward()
    return lambda: out.backward(upstream, retain_graph=True)


@pytest.mark.parametrize("mode", ["forward", "full"])
@pytest.mark.parametrize("length", [50, 77])
@pytest.mark.parametrize("provider", ["sdpa", "triton"])
def test_attention_core(benchmark, provider, length, mode):
    """The decision issue 4 asks for: which attention the adapter uses for short sequences."""
    from harma_fast.kernels.adapter_attention import attention_core
    qkv = torch.randn(N, length, 384, device=DEVICE, dtype=torch.bfloat16, requires_grad=mode == "full")

    def run():
        out = attention_core(qkv, 8, impl=provider)
        if mode == "full":
            out.backward(torch.ones_like(out))
    measure(benchmark, run, provider=provider, mode=mode, items=N, item_name="sequences", length=length,
            dtype="bf16", op="attention_core")


def _adapter_case(benchmark, provider, tower, mode, dtype):
    run = _runner(tower, provider, mode, dtype)
    measure(benchmark, run, provider=provider, mode=mode, items=N, item_name="sequences", tower=tower,
            dtype=dtype, batch=N, op="adapter")


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("provider", ["reference", "triton"])
def test_adapter(benchmark, provider, tower, mode, dtype):
    _adapter_case(benchmark, provider, tower, mode, dtype)


# a dozen inductor builds: last in the file (and in gpu_session.sh 'all'), so a time bound cuts
# these baselines rather than the attention-core choice or the eager figures, which ran after them
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("mode", ["forward", "backward", "full"])
@pytest.mark.parametrize("tower", ["image", "text"])
def test_adapter_compiled(benchmark, tower, mode, dtype):
    if not ON_GPU:
        pytest.skip("torch.compile is only measured on the GPU (CI-sized mode skips the compile)")
    _adapter_case(benchmark, "compiled", tower, mode, dtype)
