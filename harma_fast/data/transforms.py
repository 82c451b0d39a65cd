"""The paper's image transforms (torchvision), sized and normalised for the model at hand."""
from __future__ import annotations

from typing import Sequence, Tuple

from torch import nn
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def model_image_spec(model: nn.Module) -> Tuple[int, Sequence[float], Sequence[float]]:
    """(image size, mean, std) the model was trained with (open_clip's preprocess config)."""
    visual = model.visual
    size = visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    return int(size), tuple(cfg.get("mean", OPENAI_MEAN)), tuple(cfg.get("std", OPENAI_STD))


def train_transform(size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> T.Compose:
    """RandomResizedCrop(scale 0.5–1, bicubic) + horizontal flip + RandAugment(2, 7)."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.RandAugment(num_ops=2, magnitude=7),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(size: int, mean=OPENAI_MEAN, std=OPENAI_STD) -> T.Compose:
    """Bicubic resize to the model's square input."""
    return T.Compose([
        T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
