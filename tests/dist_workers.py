"""Worker functions for multi-process (gloo, CPU) tests; importable by spawned children."""
import os

import torch
import torch.distributed as dist


def init(rank, world_size, tmp):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world_size)
    torch.manual_seed(0)


def loss_worker(rank, world_size, tmp, image, text, ids, backend):
    """Each rank computes HarMALoss on its shard; saves the gradients of its own rows and of τ."""
    import harma_fast
    init(rank, world_size, tmp)
    try:
        b = image.shape[0] // world_size
        rows = slice(rank * b, (rank + 1) * b)
        i = image[rows].clone().requires_grad_()
        t = text[rows].clone().requires_grad_()
        loss = harma_fast.HarMALoss(backend=backend)
        out = loss(i, t, None if ids is None else ids[rows])
        out.total.backward()
        torch.save({"loss": out.total.detach(), "d_image": i.grad, "d_text": t.grad,
                    "d_tau": loss.temperature.grad}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def train_worker(rank, world_size, port, config):
    """One rank of a torchrun-style launch of harma_fast.train on CPU (gloo)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import logging

    logging.getLogger().setLevel(logging.ERROR)
    from harma_fast.train import train
    try:
        train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def skewed_clock_train_worker(rank, world_size, port, config):
    """train_worker whose rank 1 sees its time budget spent after the run's start (clocks differ)."""
    if rank == 1:
        import time

        import harma_fast.train as trainer
        calls = []

        def late_clock():
            calls.append(1)
            return time.monotonic() + (0 if len(calls) == 1 else 1e9)
        trainer.time = type("Clock", (), {"monotonic": staticmethod(late_clock)})
    train_worker(rank, world_size, port, config)


def user_ddp_worker(rank, world_size, tmp, images, tokens, ids, sum_hook, find_unused):
    """A researcher's own loop: a patched model in their own DDP, HarMALoss outside it; saves the
    adapter gradients and τ's."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import harma_fast
    from harma_fast.distributed import sum_gradients_hook
    from helpers import randomize_adapters, tiny_model
    init(rank, world_size, tmp)
    try:
        torch.set_num_threads(1)
        model = randomize_adapters(harma_fast.patch(tiny_model()), seed=3)
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=find_unused)
        if sum_hook:
            ddp.register_comm_hook(None, sum_gradients_hook)
        loss = harma_fast.HarMALoss(backend="reference")
        b = images.shape[0] // world_size
        rows = slice(rank * b, (rank + 1) * b)
        image_f, text_f, _ = ddp(images[rows], tokens[rows])
        loss(image_f, text_f, ids[rows]).total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"grads": grads, "d_tau": loss.temperature.grad}, f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def nan_loss_worker(rank, world_size, tmp):
    """Rank 1's features hold a NaN: every rank must raise (not wait for rank 1 in the gather)."""
    import harma_fast
    init(rank, world_size, tmp)
    try:
        image = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
        if rank == 1:
            image[2, 0] = float("nan")
        try:
            harma_fast.HarMALoss(backend="reference")(image, image.clone())
            message = "no error"
        except ValueError as e:
            message = str(e)
        with open(f"{tmp}/rank{rank}.txt", "w") as f:
            f.write(message)
        # both ranks past the gather before either tears down: a rank destroying its group while
        # the other still received the gather's data aborted that one (gloo: std::terminate)
        dist.barrier()
    finally:
        dist.destroy_process_group()
