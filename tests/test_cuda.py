"""Kernels and the fast training step on a real GPU (skipped without one; run by benchmarks/gpu_session.sh)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import harma_fast
import harma_fast.functional as HF
from harma_fast.backend import triton_interpreting
from helpers import assert_close, assert_within_torch_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(),
                                 reason="needs a CUDA GPU with TRITON_INTERPRET=0")]
DEV = "cuda"


def grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(DEV).manual_seed(seed))
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare(fast, ref, inputs, dtype):
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim else t for t in inputs]
    want = grads(ref, [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in cast])
    got = grads(fast, cast)
    if dtype == torch.float32:
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, atol=1e-4, rtol=1e-3)
    else:
        base = grads(ref, cast)
        for g, b, w in zip(got, base, want, strict=True):
            assert_within_torch_error(g, b, w, atol=2 ** -8 * max(1.0, w.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, d", [(50, 768), (77, 512)])
def test_adapter_kernels_at_vit_b32_shapes(dtype, length, d):
    from harma_fast.kernels import adapter_attention, adapter_down, adapter_up
    g = torch.Generator(DEV).manual_seed(0)
    n = 64
    h = torch.randn(n, length, d, device=DEV, generator=g)
    w, b = torch.randn(128, d, device=DEV, generator=g) * d ** -0.5, torch.randn(128, device=DEV, generator=g) * 0.1
    compare(adapter_down.down_gelu, HF.down_gelu_ref, [h, w, b], dtype)
    z, a = (torch.randn(n, length, 128, device=DEV, generator=g) for _ in range(2))
    wu, bu = torch.randn(d, 128, device=DEV, generator=g) * 0.09, torch.randn(d, device=DEV, generator=g) * 0.1
    gm, go = torch.tensor(0.6, device=DEV), torch.tensor(-0.3, device=DEV)
    compare(adapter_up.mix_up_residual, HF.mix_up_residual_ref, [z, a, wu, bu, gm, h, go, h.clone()], dtype)
    qkv = torch.randn(n, length, 384, device=DEV, generator=g)
    compare(lambda t: adapter_attention.attention_core(t, 8), lambda t: HF.attention_core_ref(t, 8), [qkv], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b", [512, 1000])
def test_loss_kernels(dtype, b):
    from harma_fast.kernels.similarity_loss import harma_loss
    from harma_fast.losses import harma_loss_ref
    g = torch.Generator(DEV).manual_seed(1)
    i = F.normalize(torch.randn(b, 512, device=DEV, generator=g), dim=1)
    t = F.normalize(i + torch.randn(b, 512, device=DEV, generator=g), dim=1)
    ids = torch.arange(b, device=DEV) // 5
    tau = torch.tensor(0.07, device=DEV)
    compare(lambda i, t, tau: torch.stack(harma_loss(i, t, tau, ids)).sum(),
            lambda i, t, tau: sum(harma_loss_ref(i, t, tau, ids)), [i, t, tau], dtype)


def test_rank_count_kernel():
    from harma_fast.metrics import count_above_ref
    from harma_fast.kernels.retrieval_ranks import count_above
    g = torch.Generator(DEV).manual_seed(2)
    q = F.normalize(torch.randn(2000, 512, device=DEV, generator=g), dim=1)
    gal = F.normalize(torch.randn(5000, 512, device=DEV, generator=g), dim=1)
    label = torch.randint(0, 5000, (2000,), device=DEV, generator=g)
    thr = (q * gal[label]).sum(1)
    owner = torch.arange(5000, device=DEV)
    assert torch.equal(count_above(q, gal, thr, label, owner), count_above_ref(q, gal, thr, label, owner))


def test_fast_train_step_matches_reference_path():
    from harma_fast.checkpoints import adapter_state_dict
    from harma_fast.fast import enable_fast_path
    from harma_fast.losses import harma_loss_ref
    torch.manual_seed(0)
    ref = harma_fast.patch(harma_fast.create_model("ViT-B-32"), backend="reference").to(DEV)
    with torch.no_grad():
        for p in adapter_state_dict(ref).values():
            if p.ndim:
                p.normal_(0, 0.3 * p.shape[-1] ** -0.5)
    fast = harma_fast.set_backend(copy.deepcopy(ref), "triton")
    enable_fast_path(fast)
    g = torch.Generator(DEV).manual_seed(3)
    images = torch.randn(32, 3, 224, 224, device=DEV, generator=g)
    tokens = torch.randint(1, 49406, (32, 77), device=DEV, generator=g)
    tokens[:, 20] = 49407
    results = []
    for model, autocast in ((copy.deepcopy(ref), False), (ref, True), (fast, True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = harma_loss_ref(model.encode_image(images, normalize=True).float(),
                                 model.encode_text(tokens, normalize=True).float(), torch.tensor(0.07, device=DEV))
        out.total.backward()
        results.append((out.total.item(), torch.cat([p.grad.flatten() for p in adapter_state_dict(model).values()])))
    (l32, g32), (lref, gref), (lfast, gfast) = results
    err_ref, err_fast = ((gref - g32).norm() / g32.norm()).item(), ((gfast - g32).norm() / g32.norm()).item()
    assert err_fast <= 2 * err_ref + 1e-2, (err_fast, err_ref)
    assert abs(lfast - l32) <= 2 * abs(lref - l32) + 5e-3 * abs(l32)
