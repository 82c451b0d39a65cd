"""Tiled rank count for retrieval recall: no score matrix, no sort.

Reference (the spec): ``harma_fast.metrics.count_above_ref``.

    count_q = #{ g : owner_g ≠ label_q  and  q · g > threshold_q }

The rank of a ground truth is the number of other-owner candidates strictly above its score,
so recall@K over an N×M gallery needs only this count: each program owns BLOCK_Q queries and
streams BLOCK_G gallery tiles (a K-loop over D, fp32 accumulation), comparing on chip. Work is
one N×M×D matrix product; memory is O((N + M)·D). Candidates of the query's own image are
skipped by owner, so the ground truth never counts against itself whatever the rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, on_device, pow2

Tensor = torch.Tensor

BLOCKS = (128, 128, 64, 8)  # BLOCK_Q, BLOCK_G, BLOCK_K, num_warps


@triton.jit
def _count_above_kernel(q_ptr, g_ptr, thr_ptr, label_ptr, owner_ptr, out_ptr,
                        NQ, NG, D, stride_q, stride_g,
                        BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_Q + tl.arange(0, BLOCK_Q)
    rmask = rows < NQ
    thr = tl.load(thr_ptr + rows, mask=rmask, other=float("inf"))
    label = tl.load(label_ptr + rows, mask=rmask, other=-1)
    count = tl.zeros((BLOCK_Q,), tl.int32)
    for g0 in range(0, NG, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G)
        cmask = cols < NG
        acc = tl.zeros((BLOCK_Q, BLOCK_G), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < D
            q = tl.load(q_ptr + rows[:, None] * stride_q + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            g = tl.load(g_ptr + cols[:, None] * stride_g + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(q, tl.trans(g), acc, input_precision=DOT_PRECISION)
        owner = tl.load(owner_ptr + cols, mask=cmask, other=-2)
        above = (acc > thr[:, None]) & (owner[None, :] != label[:, None]) & cmask[None, :]
        count += tl.sum(above.to(tl.int32), axis=1)
    tl.store(out_ptr + rows, count, mask=rmask)


def count_above(queries: Tensor, gallery: Tensor, threshold: Tensor, query_label: Tensor, gallery_owner: Tensor,
                blocks=BLOCKS) -> Tensor:
    """Triton version of ``count_above_ref`` (same arguments); returns int64 counts."""
    check_inputs("count_above", queries, gallery)
    if gallery.dtype != queries.dtype:
        gallery = gallery.to(queries.dtype)
    queries, gallery = queries.contiguous(), gallery.contiguous()
    nq, d = queries.shape
    ng = gallery.shape[0]
    bq, bg, bk, warps = blocks
    out = torch.empty(nq, dtype=torch.int32, device=queries.device)
    with on_device(queries):
        _count_above_kernel[(triton.cdiv(nq, bq),)](
            queries, gallery, threshold.float().contiguous(), query_label.long().contiguous(),
            gallery_owner.long().contiguous(), out, nq, ng, d, queries.stride(0), gallery.stride(0),
            BLOCK_Q=bq, BLOCK_G=bg, BLOCK_K=min(bk, pow2(d)), DOT_PRECISION=dot_precision(queries.dtype),
            num_warps=warps)
    return out.long()
