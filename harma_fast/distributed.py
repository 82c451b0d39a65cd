"""Gathering a batch across ranks for the loss (DESIGN §2: both terms see the gathered batch)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def world() -> Tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside ``torch.distributed``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(t: Tensor) -> list:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def gather_batch(image: Tensor, text: Tensor, image_ids: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Concatenate every rank's batch (rank order); only this rank's rows keep their graph.

    The other ranks' rows are constants here, so the gradient this rank receives for its own
    rows is exactly the gradient of the loss on the concatenated batch with respect to those
    rows (every rank computes the same loss). Summed over ranks, parameter gradients are the
    single-process ones, which is why training registers a summing (not averaging) DDP comm
    hook (``harma_fast.train``). Every rank must pass the same batch size (``drop_last=True``).

    Without ``image_ids`` each pair is its own class: ids become global row indices.

    Under ``DistributedDataParallel``, whose default averages the ranks' gradients, parameter
    gradients are then the single-process ones divided by the world size; register
    :func:`sum_gradients_hook` to get them exactly.
    """
    rank, size = world()
    if size == 1:
        return image, text, image_ids
    b = image.shape[0]
    if image_ids is None:
        image_ids = torch.arange(b, device=image.device) + rank * b
    with torch.no_grad():
        images, texts, ids = _all_gather(image.detach()), _all_gather(text.detach()), _all_gather(image_ids)
    images[rank], texts[rank] = image, text
    return torch.cat(images), torch.cat(texts), torch.cat(ids)


def sum_gradients_hook(state, bucket):
    """A DDP communication hook that sums the ranks' gradients instead of averaging them.

    ``ddp.register_comm_hook(None, sum_gradients_hook)``: with :class:`harma_fast.HarMALoss`
    gathering the batch (its default), every parameter gradient is then exactly the gradient of
    a one-process run on the concatenated batch (averaging, DDP's default, gives it divided by
    the world size). Keep the loss (its temperature) outside the wrapped module: each rank
    already holds the whole temperature gradient, which summing would multiply by the world size.
    """
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])
