"""Tiled HarMA loss: contrastive + adaptive triplet without the B×B score matrix.

Reference (the spec): ``harma_fast.losses.harma_loss_ref``.

    S = I Tᵀ;  L_c = ½(mean_i CE(S_i·/τ, P_i·) + mean_j CE(S_·j/τ, P_·j))
    L_t = ½(Σ_{i≠j} f(relu(m + S_ij − S_ii)) + Σ_{i≠j} f(relu(m + S_ij − S_jj))),  f(c) = (1−e^{−c})^γ c

Column statistics of ``S`` are row statistics of ``Sᵀ = T Iᵀ``, and every term is symmetric
under that swap, so one row kernel serves both directions (called on (I, T) and on (T, I)),
and one gradient kernel gives ``dI = G T`` and, on the swapped call, ``dT = Gᵀ I``.

Forward (per direction): a program owns BLOCK_M rows and streams BLOCK_N-column tiles of the
score matrix (a K-loop over D), keeping an online log-sum-exp, the positive-pair sum, the
triplet sum (or max) and the sum of the triplet derivatives f'(c) that the diagonal needs in
backward. Backward recomputes each tile, forms ``G = ∂L/∂S`` on chip and accumulates
``G @ T`` for a BLOCK_D slice of the output (the tile is recomputed once per slice: more
FLOPs, no atomics, deterministic). Memory is O(B·D) + a few B-vectors; the B×B matrix never
exists. fp32 accumulation for every input dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, on_device, pow2, score_tile

Tensor = torch.Tensor

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for the two kernels; BLOCK_D caps the backward's output slice.
FWD_BLOCKS = (64, 64, 64, 4)
BWD_BLOCKS = (64, 64, 64, 8)
MAX_BLOCK_D = 256


@triton.jit
def _focal(c, GAMMA: tl.constexpr):
    """f(c) = (1 − e^{−c})^γ c and f'(c), for c > 0 (callers zero inactive entries).

    w = 1 − e^{−c} is −expm1(−c): below c = 0.1 it comes from the series (fp32 ``1 − e^{−c}``
    loses digits there and is 0 for c ≲ 3e-8, where w^{γ−1} is NaN or Inf for γ ≤ 1), and it is
    floored at the smallest normal float, as the reference's ``focal_cost`` floors it.
    """
    e = tl.exp(-c)
    series = c * (1.0 - c * (0.5 - c * (0.16666666666666666 - c * (0.041666666666666664 - c * 0.008333333333333333))))
    w = tl.maximum(tl.where(c < 0.1, series, 1.0 - e), 1.1754943508222875e-38)
    if GAMMA == 2.0:
        wg1 = w
    else:
        wg1 = tl.exp((GAMMA - 1.0) * tl.log(w))
    wg = wg1 * w
    return wg * c, GAMMA * wg1 * e * c + wg


@triton.jit
def _loss_rows_kernel(a_ptr, b_ptr, ids_ptr, diag_ptr, tau_ptr,
                      lse_ptr, pos_ptr, trip_ptr, dtrip_ptr, amax_ptr,
                      B, D, stride_a, stride_b, margin,
                      GAMMA: tl.constexpr, HAS_IDS: tl.constexpr, MAX_VIOLATION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # int32 offsets: harma_loss refuses B·D >= 2**31
    rmask = rows < B
    inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
    diag_r = tl.load(diag_ptr + rows, mask=rmask, other=0.0)
    if HAS_IDS:
        id_r = tl.load(ids_ptr + rows, mask=rmask, other=0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    pos = tl.zeros((BLOCK_M,), tl.float32)
    trip = tl.zeros((BLOCK_M,), tl.float32)
    dtrip = tl.zeros((BLOCK_M,), tl.float32)
    amax = tl.zeros((BLOCK_M,), tl.int32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < B
        s = score_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        # online log-sum-exp of this row's logits
        logits = tl.where(cmask[None, :], s * inv_tau, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
        # positives: same image id (or the diagonal)
        if HAS_IDS:
            id_c = tl.load(ids_ptr + cols, mask=cmask, other=0)
            same = (id_r[:, None] == id_c[None, :]) & cmask[None, :]
        else:
            same = rows[:, None] == cols[None, :]
        pos += tl.sum(tl.where(same, s, 0.0), axis=1)
        # triplet against this row's anchor S_ii
        cost = margin + s - diag_r[:, None]
        active = (cost > 0) & (rows[:, None] != cols[None, :]) & cmask[None, :]
        f, fp = _focal(tl.where(active, cost, 1.0), GAMMA)
        f = tl.where(active, f, 0.0)
        fp = tl.where(active, fp, 0.0)
        if MAX_VIOLATION:
            tile_max = tl.max(f, axis=1)
            tile_arg = tl.argmax(f, axis=1).to(tl.int32) + n0
            fp_at = tl.sum(tl.where(cols[None, :] == tile_arg[:, None], fp, 0.0), axis=1)
            better = tile_max > trip
            trip = tl.where(better, tile_max, trip)
            dtrip = tl.where(better, fp_at, dtrip)
            amax = tl.where(better, tile_arg, amax)
        else:
            trip += tl.sum(f, axis=1)
            dtrip += tl.sum(fp, axis=1)
    tl.store(lse_ptr + rows, m_i + tl.log(l_i), mask=rmask)
    tl.store(pos_ptr + rows, pos, mask=rmask)
    tl.store(trip_ptr + rows, trip, mask=rmask)
    tl.store(dtrip_ptr + rows, dtrip, mask=rmask)
    if MAX_VIOLATION:
        tl.store(amax_ptr + rows, amax, mask=rmask)


@triton.jit
def _loss_grad_kernel(a_ptr, b_ptr, ids_ptr, cnt_ptr, diag_ptr, tau_ptr, w_ptr,
                      lse_a_ptr, lse_b_ptr, dtrip_a_ptr, dtrip_b_ptr, amax_a_ptr, amax_b_ptr,
                      da_ptr, dtau_ptr,
                      B, D, stride_a, stride_b, stride_da, margin, inv_2b,
                      GAMMA: tl.constexpr, HAS_IDS: tl.constexpr, MAX_VIOLATION: tl.constexpr,
                      COMPUTE_DTAU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < B
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < D
    inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
    wc = tl.load(w_ptr).to(tl.float32)        # upstream gradient of L_c
    wt = tl.load(w_ptr + 1).to(tl.float32)    # upstream gradient of L_t
    lse_a = tl.load(lse_a_ptr + rows, mask=rmask, other=0.0)
    diag_r = tl.load(diag_ptr + rows, mask=rmask, other=0.0)
    if HAS_IDS:
        id_r = tl.load(ids_ptr + rows, mask=rmask, other=0)
        inv_cnt = 1.0 / tl.load(cnt_ptr + rows, mask=rmask, other=1.0)
    if MAX_VIOLATION:
        amax_a = tl.load(amax_a_ptr + rows, mask=rmask, other=-1)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    dtau = tl.zeros((BLOCK_M,), tl.float32)
    for n0 in range(0, B, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < B
        s = score_tile(a_ptr, b_ptr, rows, cols, rmask, cmask, D, stride_a, stride_b,
                        BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        valid = rmask[:, None] & cmask[None, :]
        lse_b = tl.load(lse_b_ptr + cols, mask=cmask, other=0.0)
        diag_c = tl.load(diag_ptr + cols, mask=cmask, other=0.0)
        logits = s * inv_tau
        # ∂L_c/∂S: (row softmax + column softmax − 2 P) / (2 B τ)
        if HAS_IDS:
            id_c = tl.load(ids_ptr + cols, mask=cmask, other=0)
            target = tl.where(id_r[:, None] == id_c[None, :], inv_cnt[:, None], 0.0)
        else:
            target = tl.where(rows[:, None] == cols[None, :], 1.0, 0.0)
        gc = (tl.exp(logits - lse_a[:, None]) + tl.exp(logits - lse_b[None, :]) - 2.0 * target) * (inv_2b * inv_tau)
        gc = tl.where(valid, gc, 0.0)
        # ∂L_t/∂S_ij for i ≠ j: ½ f'(c^s_ij) + ½ f'(c^im_ij) (diagonal terms added after the loop)
        offdiag = (rows[:, None] != cols[None, :]) & valid
        cs = margin + s - diag_r[:, None]
        cim = margin + s - diag_c[None, :]
        act_s = (cs > 0) & offdiag
        act_im = (cim > 0) & offdiag
        if MAX_VIOLATION:
            amax_b = tl.load(amax_b_ptr + cols, mask=cmask, other=-1)
            act_s = act_s & (cols[None, :] == amax_a[:, None])
            act_im = act_im & (rows[:, None] == amax_b[None, :])
        _, fps = _focal(tl.where(act_s, cs, 1.0), GAMMA)
        _, fpim = _focal(tl.where(act_im, cim, 1.0), GAMMA)
        gt = 0.5 * (tl.where(act_s, fps, 0.0) + tl.where(act_im, fpim, 0.0))
        g = wc * gc + wt * gt
        if COMPUTE_DTAU:
            dtau += tl.sum(gc * s, axis=1)
        b_d = tl.load(b_ptr + cols[:, None] * stride_b + dcols[None, :], mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(g.to(b_d.dtype), b_d, acc, input_precision=DOT_PRECISION)
    # diagonal of ∂L_t/∂S: S_ii is the anchor of row i and of column i
    coef = -0.5 * wt * (tl.load(dtrip_a_ptr + rows, mask=rmask, other=0.0) + tl.load(dtrip_b_ptr + rows, mask=rmask, other=0.0))
    b_self = tl.load(b_ptr + rows[:, None] * stride_b + dcols[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc += coef[:, None] * b_self.to(tl.float32)
    tl.store(da_ptr + rows[:, None] * stride_da + dcols[None, :], acc.to(da_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    if COMPUTE_DTAU:
        # dL/dτ = −(wc/τ) Σ_ij (∂L_c/∂S_ij) S_ij; one partial per row, summed by the launcher
        if pid_d == 0:
            tl.store(dtau_ptr + rows, -wc * inv_tau * dtau, mask=rmask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _id_counts(ids: Tensor) -> Tensor:
    """How many rows share each row's id, without a B×B mask or a host sync."""
    sorted_ids = ids.sort().values
    return (torch.searchsorted(sorted_ids, ids, right=True) - torch.searchsorted(sorted_ids, ids)).float()


def _rows(a: Tensor, b: Tensor, ids: Optional[Tensor], diag: Tensor, tau: Tensor, margin: float, gamma: float,
          max_violation: bool, blocks) -> Tuple[Tensor, ...]:
    bsz, d = a.shape
    bm, bn, bk, warps = blocks
    out = torch.empty(4, bsz, device=a.device, dtype=torch.float32)
    amax = torch.zeros(bsz, device=a.device, dtype=torch.int32)
    with on_device(a):
        _loss_rows_kernel[(triton.cdiv(bsz, bm),)](
            a, b, ids if ids is not None else diag, diag, tau, out[0], out[1], out[2], out[3], amax,
            bsz, d, a.stride(0), b.stride(0), float(margin),
            GAMMA=float(gamma), HAS_IDS=ids is not None, MAX_VIOLATION=max_violation,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, pow2(d)), DOT_PRECISION=dot_precision(a.dtype), num_warps=warps)
    return out[0], out[1], out[2], out[3], amax


def loss_forward(image: Tensor, text: Tensor, tau: Tensor, ids: Optional[Tensor], margin: float, gamma: float,
                 max_violation: bool, blocks=FWD_BLOCKS) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns ``losses = [L_c, L_t]`` (fp32), ``stats`` (6, B) and ``amax`` (2, B) for backward."""
    check_inputs("harma_loss", image, text)
    image, text = image.contiguous(), text.contiguous()
    ids = ids.contiguous() if ids is not None else None  # read with unit stride (harma_loss passes it so)
    bsz = image.shape[0]
    diag = (image.float() * text.float()).sum(1)
    # float32 named: stats must be float32 whatever the default dtype (the fake op says so)
    cnt = _id_counts(ids) if ids is not None else torch.ones(bsz, device=image.device, dtype=torch.float32)
    lse_r, pos_r, trip_r, dtrip_r, amax_r = _rows(image, text, ids, diag, tau, margin, gamma, max_violation, blocks)
    lse_c, pos_c, trip_c, dtrip_c, amax_c = _rows(text, image, ids, diag, tau, margin, gamma, max_violation, blocks)
    inv_tau = 1.0 / tau.float()
    contrastive = ((lse_r - pos_r * inv_tau / cnt).mean() + (lse_c - pos_c * inv_tau / cnt).mean()) / 2
    triplet = (trip_r.sum() + trip_c.sum()) / 2
    stats = torch.stack([lse_r, lse_c, dtrip_r, dtrip_c, diag, cnt])
    return torch.stack([contrastive, triplet]), stats, torch.stack([amax_r, amax_c])


def _grad(a: Tensor, b: Tensor, ids, cnt, diag, tau, w, lse_a, lse_b, dtrip_a, dtrip_b, amax_a, amax_b,
          margin, gamma, max_violation, compute_dtau, blocks) -> Tuple[Tensor, Optional[Tensor]]:
    bsz, d = a.shape
    bm, bn, bk, warps = blocks
    block_d = pow2(d, hi=MAX_BLOCK_D)
    da = torch.empty_like(a)
    dtau = torch.zeros(bsz, device=a.device, dtype=torch.float32) if compute_dtau else diag
    with on_device(a):
        _loss_grad_kernel[(triton.cdiv(bsz, bm), triton.cdiv(d, block_d))](
            a, b, ids if ids is not None else diag, cnt, diag, tau, w, lse_a, lse_b, dtrip_a, dtrip_b,
            amax_a, amax_b, da, dtau, bsz, d, a.stride(0), b.stride(0), da.stride(0), float(margin), 0.5 / bsz,
            GAMMA=float(gamma), HAS_IDS=ids is not None, MAX_VIOLATION=max_violation, COMPUTE_DTAU=compute_dtau,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=min(bk, pow2(d)), BLOCK_D=block_d,
            DOT_PRECISION=dot_precision(a.dtype), num_warps=warps)
    return da, (dtau.sum() if compute_dtau else None)


def loss_backward(grad_losses: Tensor, image: Tensor, text: Tensor, tau: Tensor, ids: Optional[Tensor],
                  stats: Tensor, amax: Tensor, margin: float, gamma: float, max_violation: bool,
                  blocks=BWD_BLOCKS) -> Tuple[Tensor, Tensor, Tensor]:
    image, text = image.contiguous(), text.contiguous()
    ids = ids.contiguous() if ids is not None else None
    # the rows of stats and amax are read with unit stride (dense from loss_forward: a no-op then)
    stats, amax = stats.contiguous(), amax.contiguous()
    w = grad_losses.float().contiguous()
    lse_r, lse_c, dtrip_r, dtrip_c, diag, cnt = stats.unbind(0)
    common = dict(margin=margin, gamma=gamma, max_violation=max_violation, blocks=blocks)
    d_image, d_tau = _grad(image, text, ids, cnt, diag, tau, w, lse_r, lse_c, dtrip_r, dtrip_c, amax[0], amax[1],
                           compute_dtau=True, **common)
    d_text, _ = _grad(text, image, ids, cnt, diag, tau, w, lse_c, lse_r, dtrip_c, dtrip_r, amax[1], amax[0],
                      compute_dtau=False, **common)
    return d_image, d_text, d_tau.to(tau.dtype).reshape(tau.shape)


# --------------------------------------------------------------------------------------------
# autograd, registered as custom ops so torch.compile keeps them whole
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("harma_fast::harma_loss_fwd", mutates_args=())
def _loss_fwd_op(image: Tensor, text: Tensor, tau: Tensor, ids: Optional[Tensor], margin: float, gamma: float,
                 max_violation: bool, block_m: int, block_n: int, block_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    return loss_forward(image, text, tau, ids, margin, gamma, max_violation,
                        (block_m, block_n, block_k, FWD_BLOCKS[3]))


@_loss_fwd_op.register_fake
def _(image, text, tau, ids, margin, gamma, max_violation, block_m, block_n, block_k):
    b = image.shape[0]
    return (image.new_empty(2, dtype=torch.float32), image.new_empty(6, b, dtype=torch.float32),
            image.new_empty(2, b, dtype=torch.int32))


@torch.library.custom_op("harma_fast::harma_loss_bwd", mutates_args=())
def _loss_bwd_op(grad_losses: Tensor, image: Tensor, text: Tensor, tau: Tensor, ids: Optional[Tensor],
                 stats: Tensor, amax: Tensor, margin: float, gamma: float, max_violation: bool,
                 block_m: int, block_n: int, block_k: int) -> Tuple[Tensor, Tensor, Tensor]:
    return loss_backward(grad_losses, image, text, tau, ids, stats, amax, margin, gamma, max_violation,
                         (block_m, block_n, block_k, BWD_BLOCKS[3]))


@_loss_bwd_op.register_fake
def _(grad_losses, image, text, tau, ids, stats, amax, margin, gamma, max_violation, block_m, block_n, block_k):
    # contiguous, as loss_backward's gradients are (empty_like would keep a transposed input's strides)
    return image.new_empty(image.shape), text.new_empty(text.shape), tau.new_empty(tau.shape)


def _setup(ctx, inputs, output):
    image, text, tau, ids, margin, gamma, max_violation, bm, bn, bk = inputs
    _, stats, amax = output
    ctx.save_for_backward(image, text, tau, ids, stats, amax)
    ctx.args = (margin, gamma, max_violation, bm, bn, bk)
    ctx.set_materialize_grads(False)  # the stats are for backward only: no zero-filled gradient for them


def _backward(ctx, grad_losses, _grad_stats, _grad_amax):
    if grad_losses is None:
        return (None,) * 10
    image, text, tau, ids, stats, amax = ctx.saved_tensors
    margin, gamma, max_violation, bm, bn, bk = ctx.args
    d_image, d_text, d_tau = _loss_bwd_op(grad_losses, image, text, tau, ids, stats, amax, margin, gamma,
                                          max_violation, bm, bn, bk)
    return d_image, d_text, d_tau, None, None, None, None, None, None, None


_loss_fwd_op.register_autograd(_backward, setup_context=_setup)


def harma_loss(image: Tensor, text: Tensor, tau: Tensor, ids: Optional[Tensor] = None, margin: float = 0.2,
               gamma: float = 2.0, max_violation: bool = False, blocks: Optional[Tuple[int, int, int]] = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(total, contrastive, triplet)``, as ``harma_loss_ref``; ``blocks`` = (BLOCK_M, BLOCK_N, BLOCK_K) for tests."""
    if image.shape != text.shape or image.ndim != 2:
        raise ValueError(f"harma_loss: image and text must both be (B, D), got {tuple(image.shape)}, {tuple(text.shape)}")
    bm, bn, bk = blocks or FWD_BLOCKS[:3]
    if image.numel() >= 2 ** 31:  # int32 offsets (int64 ones cost the gradient kernel registers it has not)
        raise ValueError(f"harma_loss: a batch of {image.shape[0]} x {image.shape[1]} features is past the fused "
                         "kernel's 2**31 elements; use the reference backend")
    if image.dtype != text.dtype:  # tl.dot needs one dtype: promote, as `image @ text.T` does
        dtype = torch.promote_types(image.dtype, text.dtype)
        image, text = image.to(dtype), text.to(dtype)
    tau = tau.reshape(()).to(device=image.device)
    if ids is not None:
        ids = ids.to(device=image.device, dtype=torch.int64).contiguous()
    losses, _, _ = _loss_fwd_op(image, text, tau, ids, float(margin), float(gamma), bool(max_violation), bm, bn, bk)
    return losses[0] + losses[1], losses[0], losses[1]
