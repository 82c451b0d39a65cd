"""Recall ranks: tiled Triton count vs the chunked PyTorch count, against the bare bf16 GEMM.

Issue target (H100): 10,000 queries x 100,000 gallery items, D=512, within 2x of the time of
the bare bf16 matrix product of that size.
"""
import pytest
import torch
import torch.nn.functional as F

from benchmarks._harness import DEVICE, measure, sizes
from harma_fast.metrics import count_above_ref

NQ, NG = sizes((10_000, 100_000), (200, 1_000))
D = 512 if NQ > 1000 else 64


@pytest.fixture(scope="module")
def gallery():
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q = F.normalize(torch.randn(NQ, D, device=DEVICE, generator=g), dim=1).bfloat16()
    gal = F.normalize(torch.randn(NG, D, device=DEVICE, generator=g), dim=1).bfloat16()
    label = torch.randint(0, NG, (NQ,), device=DEVICE, generator=g)  # each query's one ground truth
    return q, gal, label, torch.arange(NG, device=DEVICE)


@pytest.mark.parametrize("provider", ["matmul", "reference", "triton"])
def test_recall_ranks(benchmark, gallery, provider):
    q, gal, label, owner = gallery
    if provider == "matmul":  # the bare product, the floor any ranking must pay
        def run():
            return q @ gal.t()
    elif provider == "reference":
        def run():
            return count_above_ref(q, gal, label, owner)
    else:
        from harma_fast.kernels.retrieval_ranks import count_above

        def run():
            return count_above(q, gal, label, owner)
    measure(benchmark, run, provider=provider, mode="forward", items=NQ, item_name="queries",
            queries=NQ, gallery=NG, op="recall")
