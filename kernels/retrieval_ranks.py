"""Tiled rank count for retrieval recall: no score matrix, no sort.

Reference (the spec): ``harma_fast.metrics.count_above_ref``.

    gt_q    = max { q · g : owner_g = label_q }           (the ground truth's score)
    count_q = #{ g : owner_g ≠ label_q  and  q · g > gt_q }

The rank of a ground truth is the number of other-owner candidates strictly above its score,
so recall@K over an N×M gallery needs only this count: each program owns BLOCK_Q queries and
streams BLOCK_G gallery tiles (a K-loop over D, fp32 accumulation), comparing on chip. The
ground truth's score comes from the same tiles as the candidates' (a first pass over the
gallery tiles that hold the program's own items), so a candidate that equals the ground truth
(a duplicate image or caption) is a tie, as the protocol wants, whatever the rounding: a score
summed another way would break such ties at random. Queries are sorted by where their own
items lie, so that first pass touches a few tiles per program. Work is about one N×M×D matrix
product; memory is O((N + M)·D).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, on_device, pow2, score_tile

Tensor = torch.Tensor

BLOCKS = (128, 128, 64, 8)  # BLOCK_Q, BLOCK_G, BLOCK_K, num_warps


@triton.jit
def _count_above_kernel(q_ptr, g_ptr, label_ptr, owner_ptr, lo_ptr, hi_ptr, out_ptr,
                        NQ, NG, D, stride_q, stride_g,
                        BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # int64: N·D may pass 2**31
    rmask = rows < NQ
    label = tl.load(label_ptr + rows, mask=rmask, other=-1)
    # pass 1: the ground truth's score, over the gallery tiles [lo, hi) that hold this block's own items
    gt = tl.full((BLOCK_Q,), float("-inf"), tl.float32)
    for g0 in range(tl.load(lo_ptr + pid), tl.load(hi_ptr + pid), BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G).to(tl.int64)  # int64: M·D may pass 2**31
        cmask = cols < NG
        acc = score_tile(q_ptr, g_ptr, rows, cols, rmask, cmask, D, stride_q, stride_g,
                         BLOCK_Q, BLOCK_G, BLOCK_K, DOT_PRECISION)
        owner = tl.load(owner_ptr + cols, mask=cmask, other=-2)
        own = (owner[None, :] == label[:, None]) & cmask[None, :]
        gt = tl.maximum(gt, tl.max(tl.where(own, acc, float("-inf")), axis=1))
    # pass 2: candidates of other owners strictly above it (the same tiles give the same scores)
    count = tl.zeros((BLOCK_Q,), tl.int32)
    for g0 in range(0, NG, BLOCK_G):
        cols = g0 + tl.arange(0, BLOCK_G).to(tl.int64)  # int64: M·D may pass 2**31
        cmask = cols < NG
        acc = score_tile(q_ptr, g_ptr, rows, cols, rmask, cmask, D, stride_q, stride_g,
                         BLOCK_Q, BLOCK_G, BLOCK_K, DOT_PRECISION)
        owner = tl.load(owner_ptr + cols, mask=cmask, other=-2)
        above = (acc > gt[:, None]) & (owner[None, :] != label[:, None]) & cmask[None, :]
        count += tl.sum(above.to(tl.int32), axis=1)
    tl.store(out_ptr + rows, count, mask=rmask)


def own_ranges(query_label: Tensor, gallery_owner: Tensor):
    """(first, last + 1) gallery index of each query's own items; first = M when it has none."""
    m = gallery_owner.shape[0]
    # labels may be any integers (negative, sparse): number them 0..n-1 first
    ids, inverse = torch.unique(torch.cat([query_label, gallery_owner]), return_inverse=True)
    query_label, gallery_owner, n_labels = inverse[:len(query_label)], inverse[len(query_label):], len(ids)
    index = torch.arange(m, device=gallery_owner.device)
    first = torch.full((n_labels,), m, dtype=torch.long, device=index.device)
    first = first.scatter_reduce(0, gallery_owner, index, reduce="amin")
    last = torch.full((n_labels,), -1, dtype=torch.long, device=index.device)
    last = last.scatter_reduce(0, gallery_owner, index, reduce="amax")
    return first[query_label], last[query_label] + 1


def count_above(queries: Tensor, gallery: Tensor, query_label: Tensor, gallery_owner: Tensor,
                blocks=BLOCKS) -> Tensor:
    """Triton version of ``count_above_ref`` (same arguments); returns int64 counts."""
    check_inputs("count_above", queries, gallery)
    dtype = torch.promote_types(queries.dtype, gallery.dtype)  # never round one side to the other's precision
    nq, d = queries.shape
    ng = gallery.shape[0]
    if gallery.ndim != 2 or gallery.shape[1] != d:  # both read with the queries' width d
        raise ValueError(f"count_above: queries ({nq}, {d}) and gallery (M, {d}) must have the same width; "
                         f"got {tuple(queries.shape)} and {tuple(gallery.shape)}")
    out = torch.zeros(nq, dtype=torch.long, device=queries.device)
    if nq == 0 or ng == 0:
        return out
    label, owner = query_label.long().contiguous(), gallery_owner.long().contiguous()
    gallery = gallery.to(dtype)
    if owner.numel() > 1 and bool((owner[1:] < owner[:-1]).any()):
        # the gallery grouped by owner (the counts do not depend on its order): a query's own items,
        # e.g. an image's five captions, then lie in one or two tiles, not across the gallery
        by_owner = torch.argsort(owner, stable=True)
        gallery, owner = gallery[by_owner], owner[by_owner]
    gallery = gallery.contiguous()
    first, end = own_ranges(label, owner)
    order = torch.argsort(first, stable=True)  # queries whose own items are near each other share a program
    queries, label, first, end = queries.to(dtype)[order].contiguous(), label[order], first[order], end[order]
    bq, bg, bk, warps = blocks
    tiles = triton.cdiv(nq, bq)
    pad = tiles * bq - nq
    lo = torch.cat([first, first.new_full((pad,), ng)]).view(tiles, bq).amin(1)
    hi = torch.cat([end, end.new_zeros(pad)]).view(tiles, bq).amax(1)
    lo = (lo // bg * bg).clamp(max=ng).to(torch.int32)  # tile-aligned: pass 1 computes pass 2's tiles
    hi = hi.clamp(min=0).to(torch.int32)
    counts = torch.empty(nq, dtype=torch.int32, device=queries.device)
    with on_device(queries):
        _count_above_kernel[(tiles,)](
            queries, gallery, label, owner, lo, hi, counts, nq, ng, d, queries.stride(0), gallery.stride(0),
            BLOCK_Q=bq, BLOCK_G=bg, BLOCK_K=min(bk, pow2(d)), DOT_PRECISION=dot_precision(dtype),
            num_warps=warps)
    out[order] = counts.long()
    return out
