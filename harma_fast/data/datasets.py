"""Datasets, the batch plan and collation for training and retrieval evaluation.

Reproducibility does not depend on how the work is split: the order of a training epoch is
a permutation drawn from ``(seed, epoch)``, cut into global batches; each rank takes its
contiguous slice of every global batch (so the gathered batch of N ranks is exactly the batch
one process would see), and every sample's augmentation is drawn from its own
``(seed, epoch, index)`` stream — the same images whatever the number of ranks or loader
workers, and a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence

import torch
from torch.utils.data import Dataset, Sampler

from ..errors import ConfigError
from ..io import open_rgb
from .annotations import EvalRecords, TrainRecords


# the one image reader (harma_fast.io): 8-bit RGB, or an ImageReadError naming the image and why not,
# also when the up-front image check was skipped
load_rgb = open_rgb


class TrainDataset(Dataset):
    """``(image tensor, caption, image id)`` per caption, augmented deterministically."""

    def __init__(self, records: TrainRecords, transform: Callable, seed: int = 0):
        self.records, self.transform, self.seed = records, transform, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int):
        image = load_rgb(self.records.images[index])
        # torchvision draws from the global torch RNG: give each sample its own stream
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF_FFFF)
            pixels = self.transform(image)
        return pixels, self.records.captions[index], self.records.image_ids[index]


class ImageDataset(Dataset):
    """The images of an evaluation set, in order."""

    def __init__(self, records: EvalRecords, transform: Callable):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records.images)

    def __getitem__(self, index: int):
        return self.transform(load_rgb(self.records.images[index]))


class TrainCollate:
    """Stacks images, tokenizes the batch's captions in one call, keeps the image ids."""

    def __init__(self, tokenizer: Callable):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        images, captions, ids = zip(*batch)
        return torch.stack(images), self.tokenizer(list(captions)), torch.tensor(ids, dtype=torch.long)


class EpochBatches(Sampler[List[int]]):
    """Batch sampler: this rank's slice of each global batch of one epoch, from ``start`` on.

    ``global_batch`` must be a multiple of ``world_size``; the last incomplete global batch is
    dropped (every rank must see the same batch size for the gathered loss).
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} is not a multiple of the {world_size} ranks")
        if n < global_batch:
            per = (f"batch of {global_batch}" if world_size == 1 else
                   f"global batch of {global_batch} ({world_size} processes x --batch-size {global_batch // world_size})")
            raise ConfigError(f"the dataset has {n} captions, fewer than one {per}; lower the batch size")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch to draw, and how many of its batches were already consumed (resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.global_batch - self.start

    def __iter__(self) -> Iterator[List[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        local = self.global_batch // self.world_size
        for b in range(self.start, self.n // self.global_batch):
            first = b * self.global_batch + self.rank * local
            yield order[first:first + local]


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
