"""Adapter output: gate mixing + up-projection + bias + block gate + residual, one GEMM.

Reference (the spec): ``harma_fast.functional.mix_up_residual_ref``.

    out = x + γ ⊙ (h + β · ((α z + (1 − α) a) Wᵀ + b)),   α = σ(g_mix), β = σ(g_out)

``z, a`` (M, r) are the adapter's down-projection and attention output, ``h, x`` (M, d) the
block's MLP output and residual stream, ``W`` (d, r). The mixing is the GEMM's prologue (on
the r-wide operand tiles) and everything after the product is its epilogue, so the four
(M, d) tensors are each read or written once. ``x``, ``β`` and ``γ`` are optional: the shared
sub-adapter's output ``a + (σ(g_s) v + (1 − σ(g_s)) u) W₂ᵀ + b₂`` is the same op.

Backward (G = ∂L/∂out, Gγ = G ⊙ γ): ``dx = G``, ``dh = Gγ`` (no copies when γ is absent);
one kernel computes ``dm' = Gγ W`` with an epilogue that writes ``dz = αβ dm'``,
``da = (1−α)β dm'`` and ``β m`` (recomputed from z, a) and reduces the gate terms
``Σ dm' ⊙ (z − a)``, ``Σ m ⊙ dm'`` and the column sums of Gγ per program; a one-program
kernel sums those partials into ``db`` and both gate gradients (a dozen tiny PyTorch ops
otherwise, each a launch, per adapter and step); ``dW = Gγᵀ (β m)`` is a plain GEMM over all
tokens (cuBLAS).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, interpreting, on_device, pow2

Tensor = torch.Tensor
MAX_R = 128  # harma_fast.functional sends wider bottlenecks to the reference


def _fwd_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
                                     (64, 256, 64, 8, 3))]  # (128, 256, 32, 8) spills 504 B in bf16 (sm_90)


def _bwd_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            # the epilogue holds dm', z, a and m in fp32 for BLOCK_M × r: at 128 threads per 64
            # rows (4 warps, or 8 for 128 rows) bf16 builds spill ~470 B (sm_90 compile check)
            # (and BLOCK_N=128 at 4 stages needs 292 KiB of shared memory in fp32: more than the chip)
            for bm, bn, w, s in ((64, 64, 8, 3), (64, 128, 8, 3), (64, 64, 8, 4))]


_BWD_MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _bwd_configs())


def _tf32(named_args, kwargs) -> bool:
    return named_args["z_ptr"].dtype == torch.float32 and kwargs.get("DOT_PRECISION") == "tf32"


def _prune_fwd(configs, named_args, **kwargs):
    # fp32 operands fed to TF32 tensor cores (the user allowed TF32) are staged in shared memory
    # at twice bf16's size: the 128×128 and 64×256 tiles need 288 KiB, more than the chip (sm_90
    # compile check); the tuner would compile and drop them on every first call
    if _tf32(named_args, kwargs):
        return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128] or configs
    return configs


def _prune_bwd(configs, named_args, **kwargs):
    if _tf32(named_args, kwargs):  # BLOCK_N = 128 needs 260 KiB in TF32 (sm_90 compile check)
        return [c for c in configs if c.kwargs["BLOCK_N"] <= 64] or configs
    return configs


# DOT_PRECISION in the key: the prunes depend on it, and a config tuned while fp32 was IEEE must not
# be reused once TF32 is allowed (the tiles it keeps then need more shared memory than sm_90 has)
@triton.autotune(configs=_fwd_configs(), key=["N", "K", "DOT_PRECISION"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _mix_up_fwd_kernel(z_ptr, a_ptr, w_ptr, b_ptr, gmix_ptr, gout_ptr, h_ptr, x_ptr, gamma_ptr, out_ptr,
                       M, N, K, stride_zm, stride_am, stride_wn, stride_hm, stride_xm, stride_om,
                       HAS_GOUT: tl.constexpr, HAS_X: tl.constexpr, HAS_GAMMA: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    # consecutive programs share rows (n fastest), so z/a tiles are reused from L2
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // n_blocks, pid % n_blocks
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·d may pass 2**31
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    alpha = tl.sigmoid(tl.load(gmix_ptr).to(tl.float32))
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = rmask[:, None] & (ks < K)[None, :]
        z = tl.load(z_ptr + rows[:, None] * stride_zm + ks[None, :], mask=kmask, other=0.0)
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :], mask=kmask, other=0.0)
        m = (alpha * z.to(tl.float32) + (1.0 - alpha) * a.to(tl.float32)).to(z.dtype)
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=cmask[None, :] & (ks < K)[:, None], other=0.0)
        acc = tl.dot(m, w, acc, input_precision=DOT_PRECISION)
    y = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_GOUT:
        y = tl.sigmoid(tl.load(gout_ptr).to(tl.float32)) * y
    mask = rmask[:, None] & cmask[None, :]
    y += tl.load(h_ptr + rows[:, None] * stride_hm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_GAMMA:
        y = y * tl.load(gamma_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    if HAS_X:
        y += tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_bwd_configs(), key=["N", "K", "DOT_PRECISION"], reset_to_zero=["part_ptr", "colsum_ptr"],
                 prune_configs_by={"early_config_prune": _prune_bwd})
@triton.jit
def _mix_up_bwd_kernel(g_ptr, w_ptr, z_ptr, a_ptr, gmix_ptr, gout_ptr, dz_ptr, da_ptr, m_ptr,
                       part_ptr, colsum_ptr, M, N, K, stride_gm, stride_wn, stride_zm, stride_am, stride_p,
                       HAS_GOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.arange(0, BLOCK_R)
    rmask, kmask = rows < M, rk < K
    acc = tl.zeros((BLOCK_M, BLOCK_R), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N
        g = tl.load(g_ptr + rows[:, None] * stride_gm + ns[None, :], mask=rmask[:, None] & nmask[None, :], other=0.0)
        w = tl.load(w_ptr + ns[:, None] * stride_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)
        # column sums of G for db and the block-gate gradient, one row of partials per program
        tl.store(colsum_ptr + pid * stride_p + ns, tl.sum(g.to(tl.float32), axis=0), mask=nmask)
    alpha = tl.sigmoid(tl.load(gmix_ptr).to(tl.float32))
    beta = 1.0
    if HAS_GOUT:
        beta = tl.sigmoid(tl.load(gout_ptr).to(tl.float32))
    mask = rmask[:, None] & kmask[None, :]
    z = tl.load(z_ptr + rows[:, None] * stride_zm + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + rows[:, None] * stride_am + rk[None, :], mask=mask, other=0.0).to(tl.float32)
    m = alpha * z + (1.0 - alpha) * a
    out = rows[:, None] * K + rk[None, :]
    tl.store(dz_ptr + out, (alpha * beta * acc).to(dz_ptr.dtype.element_ty), mask=mask)
    tl.store(da_ptr + out, ((1.0 - alpha) * beta * acc).to(da_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + out, (beta * m).to(m_ptr.dtype.element_ty), mask=mask)  # dW = Gγᵀ (β m)
    tl.store(part_ptr + pid * stride_p, tl.sum(tl.sum(acc * (z - a), axis=1), axis=0))
    tl.store(part_ptr + pid * stride_p + 1, tl.sum(tl.sum(acc * m, axis=1), axis=0))


@triton.jit
def _mix_up_gates_kernel(part_ptr, colsum_ptr, bias_ptr, gmix_ptr, gout_ptr, db_ptr, dgmix_ptr, dgout_ptr,
                         P, N, stride_p,
                         HAS_GOUT: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: ``db = β Σ_p colsum_p``, ``dg_mix = β α(1−α) Σ_p part_p0``,
    ``dg_out = β(1−β) (Σ_p part_p1 + Σ_n b_n Σ_p colsum_pn)`` — a fixed order, deterministic."""
    alpha = tl.sigmoid(tl.load(gmix_ptr).to(tl.float32))
    beta = 1.0
    if HAS_GOUT:
        beta = tl.sigmoid(tl.load(gout_ptr).to(tl.float32))
    ps = tl.arange(0, BLOCK_P)
    s_alpha = tl.zeros((BLOCK_P,), tl.float32)
    s_beta = tl.zeros((BLOCK_P,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        pm = p0 + ps < P
        s_alpha += tl.load(part_ptr + (p0 + ps) * stride_p, mask=pm, other=0.0)
        s_beta += tl.load(part_ptr + (p0 + ps) * stride_p + 1, mask=pm, other=0.0)
    bias_dot = tl.zeros((BLOCK_N,), tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        nmask = ns < N
        col = tl.zeros((BLOCK_N,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            pm = p0 + ps < P
            col += tl.sum(tl.load(colsum_ptr + (p0 + ps)[:, None] * stride_p + ns[None, :],
                                  mask=pm[:, None] & nmask[None, :], other=0.0), axis=0)
        tl.store(db_ptr + ns, (beta * col).to(db_ptr.dtype.element_ty), mask=nmask)
        bias_dot += col * tl.load(bias_ptr + ns, mask=nmask, other=0.0).to(tl.float32)
    tl.store(dgmix_ptr, (beta * alpha * (1.0 - alpha) * tl.sum(s_alpha, axis=0)).to(dgmix_ptr.dtype.element_ty))
    d_gout = 0.0
    if HAS_GOUT:
        d_gout = beta * (1.0 - beta) * (tl.sum(s_beta, axis=0) + tl.sum(bias_dot, axis=0))
    tl.store(dgout_ptr, d_gout.to(dgout_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _unit_cols(t: Tensor) -> Tensor:
    return t if t.stride(1) == 1 else t.contiguous()


def _rows(t: Tensor, width: int) -> Tensor:
    return _unit_cols(t.reshape(-1, width))


def mix_up_forward(z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor, h: Tensor,
                   gate_out: Optional[Tensor], x: Optional[Tensor], gamma: Optional[Tensor]) -> Tensor:
    check_inputs("mix_up_residual", z, a, h, x)
    m_rows, k = z.shape
    n = weight.shape[0]
    if weight.shape[1] != k or a.shape != z.shape or h.shape != (m_rows, n) or (x is not None and x.shape != h.shape):
        raise ValueError(f"mix_up_residual: z, a ({m_rows}, {k}), W ({n}, {k}), h and x ({m_rows}, {n}) expected; got "
                         f"z {tuple(z.shape)}, a {tuple(a.shape)}, W {tuple(weight.shape)}, h {tuple(h.shape)}")
    if k > MAX_R:
        raise ValueError(f"mix_up_residual: bottleneck {k} > {MAX_R} is not supported by the fused kernel")
    if gamma is not None and gamma.shape != (n,):  # read at the output columns: anything else out of bounds
        raise ValueError(f"mix_up_residual: gamma (LayerScale) must have shape ({n},), got {tuple(gamma.shape)}")
    # rows are read with unit column stride: a no-op from the wrapper (_rows), needed when the op
    # itself (torch.ops.harma_fast.mix_up_residual) is called with another layout
    z, a, h = _unit_cols(z), _unit_cols(a), _unit_cols(h)
    x = _unit_cols(x) if x is not None else None
    w = weight.to(z.dtype).contiguous()  # a no-op from the wrapper, which casts once
    bias = bias.contiguous()  # bias and γ are read with unit stride
    gamma = gamma.contiguous() if gamma is not None else None
    out = torch.empty(m_rows, n, device=z.device, dtype=out_dtype(h, x))
    grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with on_device(z):
        _mix_up_fwd_kernel[grid](
            z, a, w, bias, gate_mix, gate_out if gate_out is not None else gate_mix, h,
            x if x is not None else h, gamma if gamma is not None else bias, out,
            m_rows, n, k, z.stride(0), a.stride(0), w.stride(0), h.stride(0), (x if x is not None else h).stride(0),
            out.stride(0), HAS_GOUT=gate_out is not None, HAS_X=x is not None, HAS_GAMMA=gamma is not None,
            DOT_PRECISION=dot_precision(z.dtype))
    return out


def out_dtype(h: Tensor, x: Optional[Tensor]) -> torch.dtype:
    # as PyTorch's `x + (...)`: an fp32 residual stream plus a bf16 MLP output (autocast) is fp32
    return torch.promote_types(h.dtype, x.dtype) if x is not None else h.dtype


def mix_up_backward(g_gamma: Tensor, z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor,
                    gate_out: Optional[Tensor]):
    """``(dz, da, dW, db, dg_mix, dg_out)`` for ``g_gamma`` = γ ⊙ ∂L/∂out (M, d)."""
    m_rows, k = z.shape
    n = weight.shape[0]
    g_in = g_gamma.to(z.dtype)
    g_in = _unit_cols(g_in)
    z, a = _unit_cols(z), _unit_cols(a)  # saved inputs: as the forward read them (see mix_up_forward)
    w = weight.to(z.dtype).contiguous()
    # the gates kernel reads b with unit stride; autograd saved the bias as the caller passed it
    # (forward's contiguous copy is its own), and a strided view would give a wrong dg_out
    bias = bias.contiguous()
    dz, m = (torch.empty(m_rows, k, device=z.device, dtype=z.dtype) for _ in range(2))
    da = torch.empty(m_rows, k, device=z.device, dtype=a.dtype)  # each gradient in its input's dtype
    # one row of partials per program (2 gate terms, then n column sums), sized for the smallest
    # BLOCK_M of any config; rows of programs that do not exist stay zero
    programs = triton.cdiv(m_rows, _BWD_MIN_BLOCK_M)
    partials = torch.zeros(programs, 2 + n, device=z.device, dtype=torch.float32)
    part, colsum = partials[:, :2], partials[:, 2:]
    db = torch.empty(n, device=z.device, dtype=bias.dtype)
    d_gmix, d_gout = torch.empty_like(gate_mix), torch.empty_like(gate_mix)
    g_out = gate_out if gate_out is not None else gate_mix
    grid = lambda meta: (triton.cdiv(m_rows, meta["BLOCK_M"]),)  # noqa: E731
    with on_device(z):
        _mix_up_bwd_kernel[grid](
            g_in, w, z, a, gate_mix, g_out, dz, da, m, part, colsum,
            m_rows, n, k, g_in.stride(0), w.stride(0), z.stride(0), a.stride(0), 2 + n,
            HAS_GOUT=gate_out is not None, BLOCK_R=pow2(k), DOT_PRECISION=dot_precision(z.dtype))
        _mix_up_gates_kernel[(1,)](part, colsum, bias, gate_mix, g_out, db, d_gmix, d_gout, programs, n, 2 + n,
                                   HAS_GOUT=gate_out is not None, BLOCK_P=32, BLOCK_N=pow2(min(n, 256)),
                                   num_warps=4)
    dw = (g_in.t() @ m).to(weight.dtype)
    return dz, da, dw, db, d_gmix, d_gout


# --------------------------------------------------------------------------------------------
# autograd + torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("harma_fast::mix_up_residual", mutates_args=())
def _mix_up_op(z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor, h: Tensor,
               gate_out: Optional[Tensor], x: Optional[Tensor], gamma: Optional[Tensor]) -> Tensor:
    return mix_up_forward(z, a, weight, bias, gate_mix, h, gate_out, x, gamma)


@_mix_up_op.register_fake
def _(z, a, weight, bias, gate_mix, h, gate_out, x, gamma):
    return h.new_empty(h.shape, dtype=out_dtype(h, x))


@torch.library.custom_op("harma_fast::mix_up_residual_bwd", mutates_args=())
def _mix_up_bwd_op(g_gamma: Tensor, z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor,
                   gate_out: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return mix_up_backward(g_gamma, z, a, weight, bias, gate_mix, gate_out)


@_mix_up_bwd_op.register_fake
def _(g_gamma, z, a, weight, bias, gate_mix, gate_out):
    return (z.new_empty(z.shape), a.new_empty(z.shape), weight.new_empty(weight.shape),
            bias.new_empty(bias.shape), gate_mix.new_empty(gate_mix.shape), gate_mix.new_empty(gate_mix.shape))


def _setup(ctx, inputs, output):
    z, a, weight, bias, gate_mix, h, gate_out, x, gamma = inputs
    ctx.save_for_backward(z, a, weight, bias, gate_mix, gate_out, gamma)
    ctx.h_dtype = h.dtype
    ctx.x_dtype = x.dtype if x is not None else None
    ctx.has_gout = gate_out is not None


def _backward(ctx, grad):
    z, a, weight, bias, gate_mix, gate_out, gamma = ctx.saved_tensors
    # dx = G and dh = G ⊙ γ need no kernel (and no copy when γ is absent)
    g_gamma = grad * gamma.to(grad.dtype) if gamma is not None else grad
    dz, da, dw, db, d_gmix, d_gout = _mix_up_bwd_op(g_gamma, z, a, weight, bias, gate_mix, gate_out)
    dx = grad.to(ctx.x_dtype) if ctx.x_dtype is not None else None
    return dz, da, dw, db, d_gmix, g_gamma.to(ctx.h_dtype), d_gout if ctx.has_gout else None, dx, None


_mix_up_op.register_autograd(_backward, setup_context=_setup)


def mix_up_residual(z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor, h: Tensor,
                    gate_out: Optional[Tensor] = None, x: Optional[Tensor] = None,
                    gamma: Optional[Tensor] = None) -> Tensor:
    """Fused ``x + γ ⊙ (h + σ(g_out)((σ(g_mix) z + (1 − σ(g_mix)) a) Wᵀ + b))`` over any leading shape."""
    r, d = z.shape[-1], h.shape[-1]
    # W in the activations' dtype (as autocast casts it), once: backward reuses the cast copy
    out = _mix_up_op(_rows(z, r), _rows(a, r), weight.to(z.dtype), bias, gate_mix, _rows(h, d), gate_out,
                     _rows(x, d) if x is not None else None, gamma)
    return out.reshape(h.shape)
