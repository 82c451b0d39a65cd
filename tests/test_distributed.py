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
