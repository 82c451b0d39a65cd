"""Encoding throughput of the exported towers: ONNX Runtime against PyTorch, on the same device.

ONNX Runtime runs on the CPU provider unless onnxruntime-gpu is installed (then CUDA); PyTorch
is timed on the CPU for the comparison with ORT's CPU provider.
"""
import copy

import numpy as np
import pytest
import torch

import harma_fast
from benchmarks._harness import FULL, measure

pytest.importorskip("onnxruntime")
MODEL = "ViT-B-32" if FULL else "HarMA-Tiny"
BATCH = 32 if FULL else 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from harma_fast.export import OrtEncoder, export_onnx
    torch.manual_seed(0)
    model = harma_fast.patch(harma_fast.create_model(MODEL)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".harma." in name and p.ndim:
                p.normal_(0, p.shape[-1] ** -0.5)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out, model_name=MODEL)
    harma_fast.set_backend(model, "reference")
    return model, OrtEncoder(out)


@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("provider", ["torch-cpu", "onnxruntime"])
def test_onnx_encode(benchmark, exported, provider, tower):
    model, encoder = exported
    rng = np.random.default_rng(0)
    size = encoder.meta["image"]["size"]
    pixels = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)
    tokens = encoder.tokenizer(["a river running vertical and many red roofs on green meadow"] * BATCH)
    if provider == "onnxruntime":
        def run():
            return encoder.encode_pixels(pixels) if tower == "image" else encoder.encode_tokens(tokens)
    else:
        cpu = copy.deepcopy(model).cpu()
        px, tk = torch.from_numpy(pixels), torch.from_numpy(tokens)

        @torch.inference_mode()
        def run():
            return cpu.encode_image(px, normalize=True) if tower == "image" else cpu.encode_text(tk, normalize=True)
    measure(benchmark, run, provider=provider, mode="forward", items=BATCH,
            item_name="images" if tower == "image" else "texts", tower=tower, batch=BATCH, op="onnx", model=MODEL,
            ort_providers=",".join(encoder.providers))
