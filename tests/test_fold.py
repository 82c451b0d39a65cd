"""Export-time adapter folding (harma_fast.export.fold): the same function as the adapter, in float64."""
import copy
import dataclasses

import pytest
import torch

import harma_fast
from harma_fast.config import HarMAConfig
from harma_fast.export.fold import FoldedAdapter, fold_adapters
from harma_fast.patching import iter_adapters
from helpers import randomize_adapters, sample_inputs, tiny_model

SHARES = ("both", "text", "none")


def patched64(share: str, seq_first: bool = False, seed: int = 3):
    model = tiny_model(seq_first=seq_first)
    config = dataclasses.replace(HarMAConfig.paper(), share=share)
    model = randomize_adapters(harma_fast.patch(model, config), seed=seed)
    return harma_fast.set_backend(model, "reference").double()


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("seq_first", [False, True])
def test_folded_adapter_is_the_adapter(share, fused, seq_first):
    model = patched64(share)
    g = torch.Generator().manual_seed(0)
    for _, adapter in iter_adapters(model):
        shape = (13, 3, adapter.dim) if seq_first else (3, 13, adapter.dim)  # odd batch and length
        h, x = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(2))
        gamma = torch.rand(adapter.dim, generator=g, dtype=torch.float64) + 0.5
        folded = FoldedAdapter(adapter, fused)
        with torch.no_grad():
            for kwargs in ({}, {"x": x}, {"x": x, "gamma": gamma}):
                want = adapter(h, seq_first=seq_first, **kwargs)
                got = folded(h, seq_first=seq_first, **kwargs)
                torch.testing.assert_close(got, want, rtol=0, atol=1e-11)


@pytest.mark.parametrize("logit", [-30.0, 30.0])
def test_saturated_gates_fold_without_overflow(logit):
    # a gate trained to either end must not be divided out (no 1/σ in the folded weights)
    model = patched64("both")
    adapter = next(a for _, a in iter_adapters(model) if a.shared_module is not None)
    with torch.no_grad():
        for gate in (adapter.gate, adapter.block_gate, adapter.shared_module.gate):
            gate.fill_(logit)
    h = torch.randn(2, 7, adapter.dim, dtype=torch.float64)
    folded = FoldedAdapter(adapter, fused=True)
    assert all(torch.isfinite(b).all() and b.abs().max() < 1e3 for b in folded.buffers())
    with torch.no_grad():
        torch.testing.assert_close(folded(h), adapter(h), rtol=0, atol=1e-11)


@pytest.mark.parametrize("share", SHARES)
@pytest.mark.parametrize("seq_first", [False, True])
def test_folded_model_encodes_as_the_patched_model(share, seq_first):
    model = patched64(share, seq_first)
    work = copy.deepcopy(model)
    # all adapters folded: the image tower's read the text tower's S (share="both")
    assert fold_adapters(work, fused=True) == sum(1 for _ in iter_adapters(model))
    assert not list(iter_adapters(work))
    images, tokens = sample_inputs(model, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(work.encode_image(images.double()), model.encode_image(images.double()),
                                   rtol=0, atol=1e-10)
        torch.testing.assert_close(work.encode_text(tokens), model.encode_text(tokens), rtol=0, atol=1e-10)
    assert fold_adapters(torch.nn.Linear(2, 2)) == 0  # nothing to fold


@pytest.mark.parametrize("family", ["open_clip-siglip", "hf-clip"])
def test_mlp_wrapping_families_run_the_folded_adapters(family):
    # timm and HF blocks reach their adapter through the MLP (``mlp._harma_adapter``), not through
    # ``block.harma``: folding must re-point that reference too, or the export keeps every
    # adapter unfolded (and, with the originals out of the module tree, its attention unfused)
    from family_models import FAMILIES, SMALL, family_inputs

    model, _, _ = FAMILIES[family]()
    model = randomize_adapters(harma_fast.patch(model, SMALL, backend="reference"), seed=1).double()
    work = copy.deepcopy(model)
    assert fold_adapters(work, fused=True) == sum(1 for _ in iter_adapters(model))
    wrapped = [m for m in work.modules() if hasattr(m, "_harma_adapter")]
    assert wrapped and all(isinstance(m._harma_adapter[0], FoldedAdapter) for m in wrapped)
    images, tokens = family_inputs(model)
    with torch.no_grad():
        for encode, x in (("encode_image", images.double()), ("encode_text", tokens)):
            torch.testing.assert_close(getattr(work, encode)(x), getattr(model, encode)(x), rtol=0, atol=1e-10)
