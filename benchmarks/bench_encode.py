"""Encoding throughput of a patched ViT-B-32 (bf16, batch 1024) per backend, against stock
open_clip without adapters.

Issue target (H100): a patched ViT-B-32 encodes images and texts at no less than 0.95x of
stock unpatched open_clip's rate (published HarMA code: 15,988 vs 22,018 images/s and 11,881
vs 27,756 texts/s).
"""
import copy

import pytest
import torch

import harma_fast
from benchmarks._harness import DEVICE, measure, sizes

MODEL = sizes("ViT-B-32", "HarMA-Tiny")
BATCH = sizes(1024, 8)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    stock = harma_fast.create_model(MODEL).eval()
    patched = harma_fast.patch(copy.deepcopy(stock))
    with torch.no_grad():
        for name, p in patched.named_parameters():
            if ".harma." in name and p.ndim:
                p.normal_(0, p.shape[-1] ** -0.5)
    return {"stock": stock.to(DEVICE, torch.bfloat16), "patched": patched.to(DEVICE, torch.bfloat16)}


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("provider", ["stock", "reference", "triton"])
def test_encode(benchmark, models, provider, tower):
    model = models["stock" if provider == "stock" else "patched"]
    if provider != "stock":
        harma_fast.set_backend(model, provider)
    size = model.visual.image_size
    g = torch.Generator(device=DEVICE).manual_seed(0)
    images = torch.randn(BATCH, 3, *size, device=DEVICE, generator=g, dtype=torch.bfloat16)
    tokens = torch.randint(1, 49406, (BATCH, model.context_length), device=DEVICE, generator=g)
    tokens[:, -1] = 49407

    @torch.inference_mode()
    def run():
        return model.encode_image(images) if tower == "image" else model.encode_text(tokens)
    measure(benchmark, run, provider=provider, mode="forward", items=BATCH,
            item_name="images" if tower == "image" else "texts", tower=tower, batch=BATCH, op="encode",
            model=MODEL)
