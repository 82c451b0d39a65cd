"""The HarMA adapter modules (DESIGN §1), identity at initialisation.

    z = GELU(h W_downᵀ + b_down)                 # L×r
    a = MHA(z); a = S(a) (if shared); a = MHA(a)   # the same MHA weights twice
    m = σ(g_a) z + (1 − σ(g_a)) a
    A(h) = m W_upᵀ + b_up ;   block output  x + ls_2(h + σ(g_blk) A(h))

    S(a) = a + (σ(g_s) v + (1 − σ(g_s)) u) W_2ᵀ + b_2,   u = a W_1ᵀ + b_1,  v = MHA_64(u)

The math lives in ``harma_fast.functional``; these modules own the parameters (named as in
``nn.MultiheadAttention`` so released weights map one to one) and pick the backend.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as HF
from .backend import check_backend

Tensor = torch.Tensor


def _gate(value: float, factory) -> nn.Parameter:
    # 0-d logit, as the released code's nn.Parameter(torch.tensor(0.6)).
    return nn.Parameter(torch.full((), float(value), **factory))


class AdapterAttention(nn.Module):
    """Unmasked multi-head self-attention with ``nn.MultiheadAttention``'s parameters and init."""

    def __init__(self, dim: int, heads: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.heads = dim, heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim, **factory))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim, **factory))
        self.out_proj = nn.Linear(dim, dim, **factory)
        self.backend = "auto"
        self.reset_parameters()

    def reset_parameters(self):
        # nn.MultiheadAttention._reset_parameters: xavier on the packed projection, zero biases.
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: Tensor, seq_first: bool = False) -> Tensor:
        return HF.self_attention(x, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                                 self.out_proj.bias, self.heads, seq_first, self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}"


class SharedSubAdapter(nn.Module):
    """The multimodal shared sub-adapter ``S`` (MMS), at width ``r/2``."""

    def __init__(self, dim: int, width: int, heads: int, gate_init: float, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.l1 = nn.Linear(dim, width, **factory)
        self.attn = AdapterAttention(width, heads, **factory)
        self.l2 = nn.Linear(width, dim, **factory)
        self.gate = _gate(gate_init, factory)
        self.backend = "auto"
        nn.init.zeros_(self.l2.weight)
        nn.init.zeros_(self.l2.bias)

    def forward(self, a: Tensor, seq_first: bool = False) -> Tensor:
        u = nn.functional.linear(a, self.l1.weight, self.l1.bias)
        v = self.attn(u, seq_first)
        # w = σ(g_s) v + (1 − σ(g_s)) u, then a + w W₂ᵀ + b₂: the adapter's output op with h = a.
        return HF.mix_up_residual(v, u, self.l2.weight, self.l2.bias, self.gate, a, backend=self.backend)


class HarMAAdapter(nn.Module):
    """The gated adapter (MGA) of one transformer block of width ``dim``.

    ``shared`` is the block's ``S``: owned (registered here) when this tower owns it, or a
    reference to the text tower's ``S`` of the same layer (``share="both"``), kept out of the
    module tree so its parameters are counted and saved once.
    """

    def __init__(self, dim: int, bottleneck: int, heads: int, gate_init: float,
                 shared: Optional[SharedSubAdapter] = None, own_shared: bool = True,
                 device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.dim, self.bottleneck = dim, bottleneck
        self.down = nn.Linear(dim, bottleneck, **factory)
        self.attn = AdapterAttention(bottleneck, heads, **factory)
        self.up = nn.Linear(bottleneck, dim, **factory)
        self.gate = _gate(gate_init, factory)        # g_a: mixes z and the attention output
        self.block_gate = _gate(gate_init, factory)  # g_blk: scales A(h) in the block
        self.backend = "auto"
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if shared is not None and own_shared:
            self.shared = shared
        else:
            self.shared = None
            self._shared_ref = (shared,) if shared is not None else ()

    @property
    def shared_module(self) -> Optional[SharedSubAdapter]:
        if self.shared is not None:
            return self.shared
        return self._shared_ref[0] if self._shared_ref else None

    def set_backend(self, backend: str):
        check_backend(backend)
        self.backend = self.attn.backend = backend
        if self.shared is not None:
            self.shared.backend = self.shared.attn.backend = backend

    def forward(self, h: Tensor, x: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                seq_first: bool = False) -> Tensor:
        """``x + γ ⊙ (h + σ(g_blk) A(h))`` (``x`` and ``γ`` optional: then ``h + σ(g_blk) A(h)``)."""
        z = HF.down_gelu(h, self.down.weight, self.down.bias, self.backend)
        a = self.attn(z, seq_first)
        shared = self.shared_module
        if shared is not None:
            a = shared(a, seq_first)
        a = self.attn(a, seq_first)
        return HF.mix_up_residual(z, a, self.up.weight, self.up.bias, self.gate, h, self.block_gate,
                                  x, gamma, backend=self.backend)

    def extra_repr(self) -> str:
        ref = self.shared is None and bool(self._shared_ref)
        return f"dim={self.dim}, bottleneck={self.bottleneck}" + (", shared=<text tower's S>" if ref else "")


__all__ = ["AdapterAttention", "SharedSubAdapter", "HarMAAdapter"]
