"""The whole training step of a patched ViT-B-32: the library's reference path against the fused one.

A step is forward through both towers, the loss, backward, AdamW over the adapters and the
temperature. "reference": adapters on the PyTorch path, the stock block forward, the reference
loss (bf16 runs under autocast). "fused": Triton adapters and loss, the frozen-backbone fast
path (harma_fast.fast), bf16 features into the loss. "fused-compiled": the same under
torch.compile.

Issue targets (H100, one run): fused bf16 at batch 512 >= 10,000 pairs/s with peak memory
<= 11.5 GiB and >= 4x the reference; fp32 at batch 214 >= 3x the reference (published code:
2,094 pairs/s bf16 at 512, 22.9 GiB; 847 pairs/s fp32 at 214, 13.9 GiB).
"""
import pytest
import torch

import harma_fast
from benchmarks._harness import DEVICE, ON_GPU, measure, sizes
from harma_fast.fast import enable_fast_path

MODEL = sizes("ViT-B-32", "HarMA-Tiny")
CASES = sizes([(214, "fp32"), (512, "bf16")], [(8, "fp32"), (8, "bf16")])


def _setup(provider, batch, precision):
    torch.manual_seed(0)
    model = harma_fast.patch(harma_fast.create_model(MODEL), backend="reference" if provider == "reference"
                             else "triton").to(DEVICE)
    if provider != "reference":
        enable_fast_path(model)
    loss = harma_fast.HarMALoss(backend="reference" if provider == "reference" else "triton",
                                check_finite=False).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad] + list(loss.parameters())
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.04)
    forward = torch.compile(model) if provider == "fused-compiled" else model
    g = torch.Generator(device=DEVICE).manual_seed(0)
    size = model.visual.image_size
    images = torch.randn(batch, 3, *size, device=DEVICE, generator=g)
    tokens = torch.randint(1, 49406, (batch, model.context_length), device=DEVICE, generator=g)
    tokens[:, 30] = 49407
    ids = torch.arange(batch, device=DEVICE) // 5

    def step():
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(images, tokens)
            image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
            if provider == "reference":
                image_f, text_f = image_f.float(), text_f.float()
            total = loss(image_f, text_f, ids).total
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@pytest.mark.parametrize("batch, precision", CASES)
@pytest.mark.parametrize("provider", ["reference", "fused", "fused-compiled"])
def test_train_step(benchmark, provider, batch, precision):
    if provider == "fused-compiled" and not ON_GPU:
        pytest.skip("torch.compile is only measured on the GPU (CI-sized mode skips the compile)")
    step = _setup(provider, batch, precision)
    measure(benchmark, step, provider=provider, mode="full", items=batch, item_name="pairs", batch=batch,
            dtype=precision, op="train_step", model=MODEL, reps=20 if ON_GPU else 1)
