"""Adapter down-projection: ``z = GELU(h Wᵀ + b)``, exact (erf) GELU, in one GEMM.

Reference (the spec): ``harma_fast.functional.down_gelu_ref``.

Shapes: ``h`` (M, d) with M = tokens (N·L), d the block width (512/768/1024); ``W`` (r, d),
r the bottleneck (128). One program owns BLOCK_M rows and all r ≤ 256 output columns, so
every row of ``h`` — the large operand — is read exactly once; bias and GELU run in the
epilogue on the fp32 accumulator. The pre-activation ``p`` is stored beside ``z`` (M·r, small)
so backward needs no second GEMM to recompute it.

Backward: ``dp = dz ⊙ GELU'(p)`` in one elementwise kernel, then ``dh = dp W`` and
``dW = dpᵀ h`` — plain GEMMs over all tokens, left to cuBLAS — and ``db = Σ dp``.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, interpreting, on_device, pow2

Tensor = torch.Tensor

MAX_R = 128  # harma_fast.functional sends wider bottlenecks to the reference


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bk, w, s in ((64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 8, 4), (64, 128, 4, 3))]


def _prune(configs, named_args, **kwargs):
    # IEEE fp32 products run on FMAs with the operand tiles in registers: on sm_90 the fp32 builds
    # spill (16 B at BLOCK_K=64, 1.4 KB at 128) except the narrow-K one (sm_90 compile check)
    if named_args["h_ptr"].dtype == torch.float32:
        return [c for c in configs if c.kwargs["BLOCK_K"] <= 32] or configs
    return configs


@triton.autotune(configs=_configs(), key=["N", "K"], prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _down_gelu_fwd_kernel(h_ptr, w_ptr, b_ptr, z_ptr, p_ptr, M, N, K, stride_hm, stride_wn, stride_zm,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M·d may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    rmask, cmask = rows < M, cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        h = tl.load(h_ptr + rows[:, None] * stride_hm + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        # Wᵀ tile (BLOCK_K × BLOCK_N) read straight from W's (r, d) layout
        w = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    p = acc + tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    z = 0.5 * p * (1.0 + tl.math.erf(p * 0.7071067811865476))
    out = rows[:, None] * stride_zm + cols[None, :]
    mask = rmask[:, None] & cmask[None, :]
    tl.store(z_ptr + out, z.to(z_ptr.dtype.element_ty), mask=mask)
    tl.store(p_ptr + out, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_grad_kernel(dz_ptr, p_ptr, dp_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # GELU'(p) = Φ(p) + p φ(p)
    d = 0.5 * (1.0 + tl.math.erf(p * 0.7071067811865476)) + p * tl.exp(-0.5 * p * p) * 0.3989422804014327
    tl.store(dp_ptr + offs, (dz * d).to(dp_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def down_gelu_forward(h2: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    """``(z, p)`` for 2-D ``h2`` (M, d); parameters are cast to the activations' dtype (as autocast does)."""
    check_inputs("down_gelu", h2, weight, bias)
    m, k = h2.shape
    n = weight.shape[0]
    if weight.shape[1] != k or bias.shape != (n,):
        raise ValueError(f"down_gelu: h (M, {k}) needs W ({n}, {k}) and b ({n},); got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    if n > MAX_R:
        raise ValueError(f"down_gelu: bottleneck {n} > {MAX_R} is not supported by the fused kernel")
    h2 = h2 if h2.stride(1) == 1 else h2.contiguous()
    w = weight.to(h2.dtype).contiguous()  # a no-op from the wrapper, which casts once
    bias = bias.contiguous()  # read with unit stride
    z = torch.empty(m, n, device=h2.device, dtype=h2.dtype)
    p = torch.empty_like(z)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    with on_device(h2):
        _down_gelu_fwd_kernel[grid](h2, w, bias, z, p, m, n, k, h2.stride(0), w.stride(0), z.stride(0),
                                    BLOCK_N=pow2(n), DOT_PRECISION=dot_precision(h2.dtype))
    return z, p


def down_gelu_backward(dz: Tensor, p: Tensor, h2: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    # read flat, element by element in step: both contiguous (p from forward is; a no-op then)
    dz, p = dz.contiguous(), p.contiguous()
    dp = torch.empty_like(p)
    block = 1024
    with on_device(p):
        _gelu_grad_kernel[(triton.cdiv(p.numel(), block),)](dz, p, dp, p.numel(), BLOCK=block)
    dh = dp @ weight.to(dp.dtype)
    dw = (dp.t() @ h2).to(weight.dtype)
    db = dp.sum(0, dtype=torch.float32)  # autograd casts it to the bias's dtype if that differs
    return dh, dw, db


# --------------------------------------------------------------------------------------------
# autograd + torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("harma_fast::down_gelu", mutates_args=())
def _down_gelu_op(h2: Tensor, weight: Tensor, bias: Tensor) -> Tuple[Tensor, Tensor]:
    return down_gelu_forward(h2, weight, bias)


@_down_gelu_op.register_fake
def _(h2, weight, bias):
    z = h2.new_empty(h2.shape[0], weight.shape[0])
    return z, torch.empty_like(z)


@torch.library.custom_op("harma_fast::down_gelu_bwd", mutates_args=())
def _down_gelu_bwd_op(dz: Tensor, p: Tensor, h2: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return down_gelu_backward(dz, p, h2, weight)


@_down_gelu_bwd_op.register_fake
def _(dz, p, h2, weight):
    # contiguous, as down_gelu_backward's products are (empty_like keeps a transposed input's strides)
    return h2.new_empty(h2.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0], dtype=torch.float32)


def _setup(ctx, inputs, output):
    h2, weight, _ = inputs
    ctx.save_for_backward(h2, weight, output[1])
    ctx.set_materialize_grads(False)  # p is saved, not used downstream: no zero-filled M×r gradient for it


def _backward(ctx, dz, _dp):
    if dz is None:
        return None, None, None
    h2, weight, p = ctx.saved_tensors
    dh, dw, db = _down_gelu_bwd_op(dz, p, h2, weight)
    return dh, dw, db


_down_gelu_op.register_autograd(_backward, setup_context=_setup)


def down_gelu(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Fused ``GELU(h Wᵀ + b)`` over the last dimension of ``h`` (any leading shape)."""
    lead = h.shape[:-1]
    # W in the activations' dtype (as autocast casts it), once: backward reuses the cast copy
    z, _ = _down_gelu_op(h.reshape(-1, h.shape[-1]), weight.to(h.dtype), bias)
    return z.reshape(*lead, weight.shape[0])
