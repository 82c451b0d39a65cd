"""The adapter's attention core: softmax(q kᵀ / √hd) v over whole short sequences.

Reference (the spec): ``harma_fast.functional.attention_core_ref``.

The adapter attends with tiny heads (8 heads of 16, or of 8 inside the shared sub-adapter)
over the L = 50 (image) or 77 (text) tokens of one sample, twice per block. Generic attention
kernels tile the key axis for long sequences; here one program owns one (sample, head) and
keeps the whole sequence on chip (L ≤ MAX_L = 128 tokens: q, k, v, the L×L scores), reading
q, k, v straight out of the packed (…, 3C) in-projection — batch-first or sequence-first, by
strides — and writing the heads' outputs in place in the (…, C) layout the out-projection
reads. Forward stores the log-sum-exp per row (N·H·L floats); backward recomputes the scores
and the probabilities from it (no L×L tensor is ever stored).

Longer sequences (ViT-B-16: 197, ViT-L-14: 257 tokens) go to PyTorch's fused
``scaled_dot_product_attention``; ``HARMA_ATTENTION=sdpa`` sends every length there, to
compare (``benchmarks/bench_adapter.py`` measures both).
"""
from __future__ import annotations

import os
from typing import Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_inputs, dot_precision, on_device, pow2

Tensor = torch.Tensor
MAX_L = 128


def _warps(block_l: int, dtype: torch.dtype) -> int:
    # The L×L scores live in registers: at BLOCK_L = 128, 4 warps spill (bf16 backward: 184 B per
    # thread; fp32, whose IEEE dots run on FMAs with fp32 operands, kilobytes) — sm_90 compile check.
    if block_l >= 128:
        return 16 if dtype == torch.float32 else 8
    return 4 if block_l >= 64 else 2


@triton.jit
def _sequence_tiles(qkv_ptr, L, C, stride_b, stride_l, stride_ob, stride_ol,
                    HD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HD: tl.constexpr):
    """This program's (sample, head): the q, k, v tiles of its whole sequence and where its output goes."""
    n = tl.program_id(0).to(tl.int64)  # int64: N·L·3C may pass 2**31
    h = tl.program_id(1)
    ls = tl.arange(0, BLOCK_L).to(tl.int64)  # int64: a token stride is N·3C for sequence-first tensors
    ds = tl.arange(0, BLOCK_HD)
    lmask = ls < L
    mask = lmask[:, None] & (ds < HD)[None, :]
    qkv_off = n * stride_b + ls[:, None] * stride_l + h * HD + ds[None, :]
    q = tl.load(qkv_ptr + qkv_off, mask=mask, other=0.0)
    k = tl.load(qkv_ptr + qkv_off + C, mask=mask, other=0.0)
    v = tl.load(qkv_ptr + qkv_off + 2 * C, mask=mask, other=0.0)
    out_off = n * stride_ob + ls[:, None] * stride_ol + h * HD + ds[None, :]
    return q, k, v, qkv_off, out_off, mask, lmask, ls, n, h


@triton.jit
def _attn_fwd_kernel(qkv_ptr, out_ptr, lse_ptr, L, H, C, stride_b, stride_l, stride_ob, stride_ol, scale,
                     HD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_HD: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    q, k, v, _, out_off, mask, lmask, ls, n, h = _sequence_tiles(
        qkv_ptr, L, C, stride_b, stride_l, stride_ob, stride_ol, HD, BLOCK_L, BLOCK_HD)
    s = tl.dot(q, tl.trans(k), tl.zeros((BLOCK_L, BLOCK_L), tl.float32), input_precision=DOT_PRECISION)
    s = tl.where(lmask[None, :], s * scale, float("-inf"))
    row_max = tl.max(s, axis=1)
    p = tl.exp(s - row_max[:, None])
    row_sum = tl.sum(p, axis=1)
    o = tl.dot(p.to(v.dtype), v, tl.zeros((BLOCK_L, BLOCK_HD), tl.float32), input_precision=DOT_PRECISION)
    o = o / row_sum[:, None]
    tl.store(out_ptr + out_off, o.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + (n * H + h) * L + ls, row_max + tl.log(row_sum), mask=lmask)


@triton.jit
def _attn_bwd_kernel(qkv_ptr, out_ptr, dout_ptr, lse_ptr, dqkv_ptr, L, H, C, stride_b, stride_l,
                     stride_ob, stride_ol, stride_db, stride_dl, scale, HD: tl.constexpr, BLOCK_L: tl.constexpr,
                     BLOCK_HD: tl.constexpr, DOT_PRECISION: tl.constexpr):
    q, k, v, _, out_off, mask, lmask, ls, n, h = _sequence_tiles(
        qkv_ptr, L, C, stride_b, stride_l, stride_ob, stride_ol, HD, BLOCK_L, BLOCK_HD)
    o = tl.load(out_ptr + out_off, mask=mask, other=0.0)
    do = tl.load(dout_ptr + out_off, mask=mask, other=0.0)
    lse = tl.load(lse_ptr + (n * H + h) * L + ls, mask=lmask, other=0.0)

    zero_ll = tl.zeros((BLOCK_L, BLOCK_L), tl.float32)
    zero_ld = tl.zeros((BLOCK_L, BLOCK_HD), tl.float32)
    s = tl.dot(q, tl.trans(k), zero_ll, input_precision=DOT_PRECISION) * scale
    p = tl.where(lmask[:, None] & lmask[None, :], tl.exp(s - lse[:, None]), 0.0)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, zero_ld, input_precision=DOT_PRECISION)
    dp = tl.dot(do, tl.trans(v), zero_ll, input_precision=DOT_PRECISION)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    dsc = p * (dp - delta[:, None]) * scale  # ∂L/∂(q kᵀ), the softmax Jacobian applied row by row
    dq = tl.dot(dsc.to(k.dtype), k, zero_ld, input_precision=DOT_PRECISION)
    dk = tl.dot(tl.trans(dsc.to(q.dtype)), q, zero_ld, input_precision=DOT_PRECISION)
    # the gradient has strides of its own: qkv may be a strided view (a token slice) of a larger tensor
    d_off = n * stride_db + ls[:, None] * stride_dl + h * HD + tl.arange(0, BLOCK_HD)[None, :]
    ty = dqkv_ptr.dtype.element_ty
    tl.store(dqkv_ptr + d_off, dq.to(ty), mask=mask)
    tl.store(dqkv_ptr + d_off + C, dk.to(ty), mask=mask)
    tl.store(dqkv_ptr + d_off + 2 * C, dv.to(ty), mask=mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _layout(t: Tensor, seq_first: bool) -> Tuple[int, int, int, int]:
    """(N, L, stride over samples, stride over tokens) of a (N, L, ·) or (L, N, ·) tensor."""
    if seq_first:
        return t.shape[1], t.shape[0], t.stride(1), t.stride(0)
    return t.shape[0], t.shape[1], t.stride(0), t.stride(1)


def attention_forward(qkv: Tensor, heads: int, seq_first: bool) -> Tuple[Tensor, Tensor]:
    check_inputs("attention_core", qkv)
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    n, length, sb, sl = _layout(qkv, seq_first)
    c = qkv.shape[-1] // 3
    hd = c // heads
    out = torch.empty(*qkv.shape[:-1], c, device=qkv.device, dtype=qkv.dtype)
    _, _, ob, ol = _layout(out, seq_first)
    lse = torch.empty(n, heads, length, device=qkv.device, dtype=torch.float32)
    block_l = pow2(length)
    with on_device(qkv):
        _attn_fwd_kernel[(n, heads)](qkv, out, lse, length, heads, c, sb, sl, ob, ol, hd ** -0.5,
                                     HD=hd, BLOCK_L=block_l, BLOCK_HD=pow2(hd), DOT_PRECISION=dot_precision(qkv.dtype),
                                     num_warps=_warps(block_l, qkv.dtype))
    return out, lse


def attention_backward(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, seq_first: bool) -> Tensor:
    qkv = qkv if qkv.stride(-1) == 1 else qkv.contiguous()
    # out is read through its strides but with unit stride over channels, lse densely (both are so
    # from attention_forward: no-ops then); dout is read with out's strides
    out = out if out.stride(-1) == 1 else out.contiguous()
    lse = lse.contiguous()
    dout = dout.contiguous() if dout.stride() != out.stride() else dout
    n, length, sb, sl = _layout(qkv, seq_first)
    _, _, ob, ol = _layout(out, seq_first)
    c = qkv.shape[-1] // 3
    hd = c // heads
    dqkv = torch.empty(qkv.shape, device=qkv.device, dtype=qkv.dtype)
    _, _, db, dl = _layout(dqkv, seq_first)
    block_l = pow2(length)
    with on_device(qkv):
        _attn_bwd_kernel[(n, heads)](qkv, out, dout, lse, dqkv, length, heads, c, sb, sl, ob, ol, db, dl, hd ** -0.5,
                                     HD=hd, BLOCK_L=block_l, BLOCK_HD=pow2(hd), DOT_PRECISION=dot_precision(qkv.dtype),
                                     num_warps=_warps(block_l, qkv.dtype))
    return dqkv


# --------------------------------------------------------------------------------------------
# autograd + torch.library registration
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("harma_fast::attention_core", mutates_args=())
def _attn_op(qkv: Tensor, heads: int, seq_first: bool) -> Tuple[Tensor, Tensor]:
    return attention_forward(qkv, heads, seq_first)


@_attn_op.register_fake
def _(qkv, heads, seq_first):
    n, length = (qkv.shape[1], qkv.shape[0]) if seq_first else (qkv.shape[0], qkv.shape[1])
    return (qkv.new_empty(*qkv.shape[:-1], qkv.shape[-1] // 3),
            qkv.new_empty(n, heads, length, dtype=torch.float32))


@torch.library.custom_op("harma_fast::attention_core_bwd", mutates_args=())
def _attn_bwd_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, seq_first: bool) -> Tensor:
    return attention_backward(dout, qkv, out, lse, heads, seq_first)


@_attn_bwd_op.register_fake
def _(dout, qkv, out, lse, heads, seq_first):
    return qkv.new_empty(qkv.shape)  # contiguous, as attention_backward allocates it (empty_like keeps a permutation)


def _setup(ctx, inputs, output):
    qkv, heads, seq_first = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.heads, ctx.seq_first = heads, seq_first
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the unused log-sum-exp (a launch)


def _backward(ctx, dout, _dlse):
    if dout is None:
        return None, None, None
    qkv, out, lse = ctx.saved_tensors
    return _attn_bwd_op(dout, qkv, out, lse, ctx.heads, ctx.seq_first), None, None


_attn_op.register_autograd(_backward, setup_context=_setup)


def attention_sdpa(qkv: Tensor, heads: int, seq_first: bool = False) -> Tensor:
    """The same function through PyTorch's fused scaled_dot_product_attention."""
    if seq_first:
        return attention_sdpa(qkv.transpose(0, 1), heads).transpose(0, 1)
    n, length, c3 = qkv.shape
    q, k, v = qkv.view(n, length, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, c3 // 3)


def default_impl() -> str:
    impl = os.environ.get("HARMA_ATTENTION", "triton")
    if impl not in ("triton", "sdpa"):
        raise ValueError(f"HARMA_ATTENTION must be 'triton' or 'sdpa', got {impl!r}")
    return impl


def attention_core(qkv: Tensor, heads: int, seq_first: bool = False, impl: str = None) -> Tensor:
    """Unmasked multi-head attention from packed ``[q | k | v]`` (``(N, L, 3C)``, or ``(L, N, 3C)``)."""
    length = qkv.shape[0] if seq_first else qkv.shape[1]
    if (impl or default_impl()) == "sdpa" or length > MAX_L:
        return attention_sdpa(qkv, heads, seq_first)
    return _attn_op(qkv, heads, seq_first)[0]
