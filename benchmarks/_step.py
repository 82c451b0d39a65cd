"""One training step of a patched CLIP, built the way the benchmark and the profiler time it.

A step is forward through both towers, the loss, backward, AdamW over the adapters and the
temperature. Providers:

- ``reference``: adapters on the PyTorch path, the stock block forward, the reference loss
  (bf16 runs under autocast, features cast to fp32 for the loss), AdamW as the trainer runs it;
- ``fused``: Triton adapters and loss, the frozen-backbone fast path (harma_fast.fast), bf16
  features into the loss, AdamW with ``fused=True`` on CUDA (as the trainer uses it);
- ``fused-compiled`` or ``fused-compiled:MODE``: the same model under ``torch.compile`` with
  that mode (``default``, ``reduce-overhead``, ``max-autotune-no-cudagraphs``, ...).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

import harma_fast
from harma_fast.fast import enable_fast_path
from harma_fast.train import fused_optimizer_ok


def parse_provider(provider: str):
    """``"fused-compiled:reduce-overhead"`` -> ``("fused-compiled", "reduce-overhead")``."""
    name, _, mode = provider.partition(":")
    if name not in ("reference", "fused", "fused-compiled") or (mode and name != "fused-compiled"):
        raise ValueError(f"unknown provider {provider!r}: use reference, fused, fused-compiled or "
                         "fused-compiled:<torch.compile mode>")
    return name, (mode or None)


def make_train_step(provider: str, batch: int, precision: str, model_name: str,
                    device: torch.device) -> Callable[[], None]:
    """A closure running one whole training step on random data (seeded, so runs compare)."""
    name, mode = parse_provider(provider)
    reference = name == "reference"
    torch.manual_seed(0)
    model = harma_fast.patch(harma_fast.create_model(model_name),
                             backend="reference" if reference else "triton").to(device)
    if not reference:
        enable_fast_path(model)
    loss = harma_fast.HarMALoss(backend="reference" if reference else "triton", check_finite=False).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(loss.parameters())
    fused = fused_optimizer_ok(params)  # as the trainer, whatever the backend: the ratio is the model's
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.04,
                            **({"fused": True} if fused else {}))
    forward = model
    if name == "fused-compiled":
        # static shapes: a benchmark's earlier compile (another batch) must not leave a symbolic-shape graph
        forward = torch.compile(model, mode=None if mode in (None, "default") else mode, dynamic=False)
    # CUDA-graph modes replay into the same output buffers: each step must say it starts anew
    mark_step: Optional[Callable[[], None]] = None
    if mode and "cudagraphs" not in mode and mode != "default" and device.type == "cuda":
        mark_step = torch.compiler.cudagraph_mark_step_begin
    g = torch.Generator(device=device).manual_seed(0)
    size = model.visual.image_size
    images = torch.randn(batch, 3, *size, device=device, generator=g)
    tokens = torch.randint(1, 49406, (batch, model.context_length), device=device, generator=g)
    tokens[:, 30] = 49407
    ids = torch.arange(batch, device=device) // 5

    def step():
        if mark_step is not None:
            mark_step()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(images, tokens)
            image_f, text_f = (out["image_features"], out["text_features"]) if isinstance(out, dict) else out[:2]
            if reference:
                image_f, text_f = image_f.float(), text_f.float()
            total = loss(image_f, text_f, ids).total
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.fused_adamw = fused  # the profile reports it: the issue asks for fused AdamW
    return step
