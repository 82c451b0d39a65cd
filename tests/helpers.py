"""Shared test helpers: verbose comparisons, tiny models, random adapters."""
from __future__ import annotations

import copy
from typing import Optional

import torch

import harma_fast
from harma_fast.checkpoints import adapter_state_dict


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0, name: str = ""):
    """allclose that says where and by how much, and never lets NaN/Inf through."""
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {(~torch.isfinite(actual)).nonzero()[:5].tolist()}"
    assert torch.isfinite(expected).all(), f"{name}: reference has non-finite values"
    diff = (actual - expected).abs()
    bad = diff > atol + rtol * expected.abs()
    if bad.any():
        idx = tuple(int(i) for i in (diff == diff.max()).nonzero()[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{diff.numel()} elements differ; max abs diff {diff.max().item():.3e} at {idx} "
            f"(actual {actual[idx].item():.6g}, expected {expected[idx].item():.6g}); atol={atol}, rtol={rtol}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values"
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def assert_within_torch_error(fast: torch.Tensor, torch_same_dtype: torch.Tensor, ref64: torch.Tensor,
                              atol: float = 1e-5, factor: float = 2.0, name: str = ""):
    """Low precision is judged against PyTorch's own error in that dtype (flash-attention's rule):
    max|fast − ref64| <= factor · max|torch − ref64| + atol."""
    fast, torch_same_dtype, ref64 = (t.detach().double().cpu() for t in (fast, torch_same_dtype, ref64))
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast - ref64).abs().max().item()
    err_torch = (torch_same_dtype - ref64).abs().max().item()
    assert err_fast <= factor * err_torch + atol, \
        f"{name}: error {err_fast:.3e} > {factor} x torch's {err_torch:.3e} + {atol}"


def tiny_model(seed: int = 0, seq_first: bool = False, name: str = "HarMA-Tiny"):
    torch.manual_seed(seed)
    model = harma_fast.create_model(name).eval()
    if seq_first:
        make_seq_first(model)
    return model


def make_seq_first(model):
    """Turn both towers into sequence-first (L, N, D) stacks, as older open_clip ran them."""
    for transformer in (model.visual.transformer, model.transformer):
        transformer.batch_first = False
        for block in transformer.resblocks:
            block.attn.batch_first = False
    return model


def frozen_copy(model):
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    return ref


def randomize_adapters(model, seed: int = 0, scale: float = 0.5):
    """Non-zero random values in every adapter weight and gate (a trained model's state)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_state_dict(model).values():
            if p.ndim == 0:
                p.copy_(torch.randn((), generator=g) * 1.5)
            else:
                bound = scale / max(1, p.shape[-1]) ** 0.5 * 2
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return model


def sample_inputs(model, batch: int = 3, seed: int = 0, length: Optional[int] = None):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(batch, 3, size[0], size[1], generator=g)
    ctx = length or model.context_length
    tokens = torch.randint(1, 1000, (batch, ctx), generator=g)
    tokens[:, 0] = 49406
    # eot at varying positions, padding after it (the padding takes part in adapter attention)
    for i in range(batch):
        end = 3 + (i * 5) % (ctx - 4)
        tokens[i, end] = 49407
        tokens[i, end + 1:] = 0
    return images, tokens
