import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import harma_fast
from dist_workers import loss_worker
from helpers import assert_close


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_two_process_loss_gradients_equal_single_process(tmp_path, gen, with_ids, backend):
    b, d, world = 12, 16, 2
    image = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    text = F.normalize(image + torch.randn(b, d, generator=gen), dim=1)
    # the same image's captions on both ranks: positives across the gathered batch
    ids = torch.tensor([0, 1, 2, 3, 4, 0, 5, 2, 6, 7, 8, 0]) if with_ids else None

    i, t = image.clone().requires_grad_(), text.clone().requires_grad_()
    single = harma_fast.HarMALoss(backend="reference")
    out = single(i, t, ids)
    out.total.backward()

    mp.spawn(loss_worker, args=(world, str(tmp_path), image, text, ids, backend), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        rows = slice(rank * b // world, (rank + 1) * b // world)
        assert_close(got["loss"], out.total, atol=1e-5, name=f"rank {rank} loss")
        assert_close(got["d_image"], i.grad[rows], atol=1e-6, rtol=1e-4, name=f"rank {rank} d_image")
        assert_close(got["d_text"], t.grad[rows], atol=1e-6, rtol=1e-4, name=f"rank {rank} d_text")
        assert_close(got["d_tau"], single.temperature.grad, atol=1e-5, rtol=1e-5, name=f"rank {rank} d_tau")


@pytest.mark.parametrize("sum_hook,find_unused", [(True, False), (True, True), (False, False)])
def test_users_own_ddp_loop_gets_the_single_process_gradients_with_the_summing_hook(tmp_path, sum_hook,
                                                                                   find_unused):
    # HarMALoss gathers the batch, so each rank already holds the gradient of the whole loss for its
    # rows: DDP's averaging halves it on 2 ranks, harma_fast.distributed.sum_gradients_hook makes it exact
    from dist_workers import user_ddp_worker
    from helpers import randomize_adapters, sample_inputs, tiny_model
    world = 2
    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=3)
    images, tokens = sample_inputs(model, batch=8)
    ids = torch.tensor([0, 1, 1, 2, 3, 0, 4, 5])  # image 0's captions on both ranks
    loss = harma_fast.HarMALoss(backend="reference")
    image_f, text_f, _ = model(images, tokens)
    loss(image_f, text_f, ids).total.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    mp.spawn(user_ddp_worker, args=(world, str(tmp_path), images, tokens, ids, sum_hook, find_unused),
             nprocs=world, join=True)
    scale = 1.0 if sum_hook else 1.0 / world
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert set(got["grads"]) == set(want)
        for n, g in want.items():
            assert_close(got["grads"][n], scale * g, atol=1e-6 * g.abs().max().item() + 1e-9, rtol=1e-3,
                         name=f"rank {rank} {n}")
        assert_close(got["d_tau"], loss.temperature.grad, atol=1e-5, rtol=1e-5, name=f"rank {rank} d_tau")


def test_nan_features_on_one_rank_raise_on_every_rank(tmp_path):
    # the NaN check ran before the gather: rank 1 raised, rank 0 waited in the gather for good
    from dist_workers import nan_loss_worker
    context = mp.spawn(nan_loss_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    deadline = 300  # a hang, not a slow start: spawning and importing torch takes a while on a loaded CI machine
    import time
    start = time.monotonic()
    while True:
        try:
            if context.join(timeout=1):
                break
        except mp.ProcessExitedException:
            # gloo now and then aborts a process in its teardown (std::terminate, SIGABRT), after the
            # rank wrote what the loss raised (and passed a barrier): the files below say what each did
            break
        if time.monotonic() - start > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"a rank is still waiting in the loss's gather after {deadline} s")
    for rank in range(2):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "image_features has NaN/Inf values (rows [5])" in message, f"rank {rank}: {message}"
