"""The adapter's ops: PyTorch references (the spec) and the dispatching functional API.

Every op here has a reference (``*_ref``) written as the plain formula of DESIGN §1. Tests,
benchmarks, the CPU path and ONNX export all call these references; the Triton kernels in
``harma_fast.kernels`` must compute the same function, forward and backward.

Layouts: token-wise ops (``down_gelu``, ``mix_up_residual``) act on the last dimension and take
any leading shape. Attention needs the sequence axis: tensors are ``(N, L, C)`` when
``seq_first`` is False and ``(L, N, C)`` when True (open_clip's two block layouts).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .backend import use_triton

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------
def down_gelu_ref(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """``z = GELU(h Wᵀ + b)`` with the exact (erf) GELU."""
    return F.gelu(F.linear(h, weight, bias))


def attention_core_ref(qkv: Tensor, heads: int, seq_first: bool = False) -> Tensor:
    """Unmasked multi-head softmax attention from a packed ``[q | k | v]`` projection.

    ``qkv``: ``(N, L, 3C)`` (or ``(L, N, 3C)`` when ``seq_first``); returns ``(N, L, C)``
    (resp. ``(L, N, C)``), heads concatenated as ``nn.MultiheadAttention`` does.
    """
    if seq_first:
        return attention_core_ref(qkv.transpose(0, 1), heads).transpose(0, 1)
    n, length, c3 = qkv.shape
    c = c3 // 3
    hd = c // heads
    q, k, v = qkv.reshape(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # each N,H,L,hd
    scores = torch.matmul(q * hd ** -0.5, k.transpose(-1, -2))
    out = torch.matmul(scores.softmax(dim=-1), v)  # N,H,L,hd
    return out.transpose(1, 2).reshape(n, length, c)


def mix_up_residual_ref(z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor,
                        h: Tensor, gate_out: Optional[Tensor] = None, x: Optional[Tensor] = None,
                        gamma: Optional[Tensor] = None) -> Tensor:
    """``x + γ ⊙ (h + σ(g_out) · ((σ(g_mix) z + (1 − σ(g_mix)) a) Wᵀ + b))``.

    The adapter's output stage (``g_mix = g_a``, ``g_out = g_blk``, ``γ`` the block's
    LayerScale, ``x`` the residual stream) and, with ``x``, ``g_out`` and ``γ`` left out, the
    shared sub-adapter's output ``a + (σ(g_s) v + (1 − σ(g_s)) u) W₂ᵀ + b₂``.
    """
    alpha = torch.sigmoid(gate_mix)
    m = alpha * z + (1 - alpha) * a
    y = F.linear(m, weight, bias)
    if gate_out is not None:
        y = torch.sigmoid(gate_out) * y
    y = h + y
    if gamma is not None:
        y = y * gamma
    return y if x is None else x + y


# --------------------------------------------------------------------------------------------
# dispatching API (reference or Triton)
# --------------------------------------------------------------------------------------------
# The fused adapter kernels hold a whole bottleneck row (r values) per tile: up to 128, the paper's
# r; wider ones spill registers and overflow shared memory (sm_90 compile check) and run the reference.
MAX_FUSED_BOTTLENECK = 128


def down_gelu(h: Tensor, weight: Tensor, bias: Tensor, backend: str = "auto") -> Tensor:
    if weight.shape[0] <= MAX_FUSED_BOTTLENECK and use_triton(backend, h, weight):
        from .kernels.adapter_down import down_gelu as fused
        return fused(h, weight, bias)
    return down_gelu_ref(h, weight, bias)


def attention_core(qkv: Tensor, heads: int, seq_first: bool = False, backend: str = "auto") -> Tensor:
    if use_triton(backend, qkv):
        from .kernels.adapter_attention import attention_core as fused
        return fused(qkv, heads, seq_first)
    return attention_core_ref(qkv, heads, seq_first)


def self_attention(x: Tensor, in_weight: Tensor, in_bias: Tensor, out_weight: Tensor, out_bias: Tensor,
                   heads: int, seq_first: bool = False, backend: str = "auto") -> Tensor:
    # The projections are plain GEMMs over all N·L tokens (cuBLAS is as good as it gets there);
    # only the attention core, tiny heads over short sequences, has a kernel of its own.
    core = attention_core(F.linear(x, in_weight, in_bias), heads, seq_first, backend)
    return F.linear(core, out_weight, out_bias)


def mix_up_residual(z: Tensor, a: Tensor, weight: Tensor, bias: Tensor, gate_mix: Tensor, h: Tensor,
                    gate_out: Optional[Tensor] = None, x: Optional[Tensor] = None,
                    gamma: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    # A trainable LayerScale would need dγ, which the kernel does not produce (backbones are frozen).
    trainable_gamma = gamma is not None and gamma.requires_grad and torch.is_grad_enabled()
    if not trainable_gamma and z.shape[-1] <= MAX_FUSED_BOTTLENECK and use_triton(backend, z, a, h):
        from .kernels.adapter_up import mix_up_residual as fused
        return fused(z, a, weight, bias, gate_mix, h, gate_out, x, gamma)
    return mix_up_residual_ref(z, a, weight, bias, gate_mix, h, gate_out, x, gamma)
