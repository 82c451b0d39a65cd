"""Retrieval evaluation of an open_clip model (patched or not) on an evaluation file."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data.annotations import EvalRecords
from .data.datasets import ImageDataset, batched
from .errors import ConfigError
from .metrics import retrieval_metrics
from .progress import bar_wanted

Tensor = torch.Tensor


def _autocast(device: torch.device, precision: str):
    # bf16 where it was asked for, the CPU included (as training does); "auto" chose fp32 on the CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_backend_runs(backend: str, device: torch.device) -> None:
    """Refuse up front a backend that cannot run on ``device``, not after encoding a whole set."""
    from .backend import triton_available, triton_interpreting

    if backend != "triton":
        return
    if not triton_available():
        raise ConfigError("--backend triton needs the triton package (pip install triton); use --backend auto "
                          "(Triton where it runs, PyTorch elsewhere) or reference")
    if device.type != "cuda" and not triton_interpreting():
        raise ConfigError(f"--backend triton runs on a CUDA GPU and this runs on {device.type}: use --backend "
                          "auto (Triton where it runs, PyTorch elsewhere) or reference")


@torch.no_grad()
def encode_records(model: nn.Module, records: EvalRecords, transform: Callable, tokenizer: Callable,
                   device="cpu", batch_size: int = 128, num_workers: int = 0, precision: str = "fp32",
                   progress: bool = True) -> Tuple[Tensor, Tensor]:
    """L2-normalised (image, caption) embeddings of an evaluation set, in file order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"the evaluation batch size must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(ImageDataset(records, transform), batch_size=batch_size, num_workers=num_workers)
    images, texts = [], []
    with _autocast(device, precision):
        for pixels in tqdm(loader, desc="encoding images", leave=False, disable=not bar_wanted(progress)):
            images.append(model.encode_image(pixels.to(device), normalize=True).float())
        for chunk in tqdm(list(batched(records.captions, batch_size)), desc="encoding captions", leave=False,
                          disable=not bar_wanted(progress)):
            texts.append(model.encode_text(tokenizer(list(chunk)).to(device), normalize=True).float())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def evaluate(model: nn.Module, records: EvalRecords, transform: Callable, tokenizer: Callable, device="cpu",
             batch_size: int = 128, num_workers: int = 0, precision: str = "fp32", backend: str = "auto",
             progress: bool = True) -> Dict[str, float]:
    """R@1/5/10 both ways and mR (percent) by the protocol of DESIGN §2."""
    image, text = encode_records(model, records, transform, tokenizer, device, batch_size, num_workers, precision,
                                 progress)
    return retrieval_metrics(image, text, torch.tensor(records.text_to_image, device=image.device), backend=backend)


def format_metrics(metrics: Dict[str, float], title: Optional[str] = None) -> str:
    """The usual retrieval table: image→text and text→image recalls, and mR."""
    head = "| R@1 (i→t) | R@5 | R@10 | R@1 (t→i) | R@5 | R@10 | mR |"
    keys = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    row = "| " + " | ".join(f"{metrics[k]:.2f}" for k in keys) + " |"
    lines = ([title] if title else []) + [head, "|" + "---|" * 7, row]
    return "\n".join(lines)
