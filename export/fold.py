"""Export-time folding of each HarMA adapter into the fewest, cheapest graph ops.

An exported adapter has constant weights and gates, so every chain of linear maps between two
non-linear ops can be multiplied out once, in float64, on the exporter's private copy
(DESIGN §1 notation, row vectors, ``Att(x; W, b)`` = multi-head attention of ``x W + b``
*before* its output projection ``O``, ``σ`` the sigmoid of a gate logit):

    z  = GELU(h W_down + b_down)
    t₁ = Att(z; W_in, b_in)                       # first pass; a = t₁ O + b_o is never formed
    t₂ = Att(t₁; O W_in, b_o W_in + b_in)         # second pass reads t₁ through O·W_in
    m  = σ_a z + t₂ (1 − σ_a) O + (1 − σ_a) b_o
    y  = h + m (σ_blk W_up) + σ_blk b_up          # then x + γ ⊙ y as the block asks

With the shared sub-adapter ``S`` between the passes (``u = a W₁ + b₁``, its attention ``t_s``
at width r/2, ``S(a) = a + (σ_s (t_s O₆₄ + b_o₆₄) + (1 − σ_s) u) W₂ + b₂``), both ``u`` and
the second pass's input are linear in ``t₁`` and ``t_s``:

    t_s = Att(t₁; O W₁ W_in⁶⁴, (b_o W₁ + b₁) W_in⁶⁴ + b_in⁶⁴)
    t₂  = Att([t₁ | t_s]; [O (I + (1 − σ_s) W₁ W₂) ; σ_s O₆₄ W₂] W_in, c)

So an adapter is 2–3 attention ops, three MatMuls and a few element-wise ops, against ~20
nodes and two more projections unfolded: the out-projections, ``S``'s two linears and the
gate mixing disappear (ViT-B-32 image graph: 485 → 329 nodes). On the CPU provider this did not
change throughput beyond ±1% (the adapters' cost there is their arithmetic, benchmarks/RESULTS.md);
fewer nodes matter where each node is a kernel launch (GPU providers). The function is the same up
to float rounding — the export's parity check compares every graph with the unfolded PyTorch
model. Attention runs through :func:`harma_fast.export.fuse.attention` (one
``com.microsoft.Attention``) or, for ``--plain-onnx`` graphs, its standard-op body.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..modules import HarMAAdapter
from .fuse import attention, attention_math

Tensor = torch.Tensor


def _t(linear_weight: Tensor) -> Tensor:
    """A ``nn.Linear``/in-projection weight ``(out, in)`` as the right-hand matrix ``(in, out)``, float64."""
    return linear_weight.detach().double().t()


class FoldedAdapter(nn.Module):
    """``h ↦ x + γ ⊙ (h + σ(g_blk) A(h))`` of one :class:`HarMAAdapter`, weights multiplied out."""

    def __init__(self, adapter: HarMAAdapter, fused: bool):
        super().__init__()
        dtype = adapter.down.weight.dtype
        self.fused, self.heads = fused, adapter.attn.heads
        sig = lambda gate: torch.sigmoid(gate.detach().double())  # noqa: E731
        w_in, b_in = _t(adapter.attn.in_proj_weight), adapter.attn.in_proj_bias.detach().double()
        o, b_o = _t(adapter.attn.out_proj.weight), adapter.attn.out_proj.bias.detach().double()
        s_a, s_blk = sig(adapter.gate), sig(adapter.block_gate)
        weights = {
            "down_w": _t(adapter.down.weight), "down_b": adapter.down.bias.detach().double(),
            "att1_w": w_in, "att1_b": b_in,
            "mix_gate": s_a.reshape(1),
            "out_w": (1 - s_a) * o, "out_b": (1 - s_a) * b_o,
            "up_w": s_blk * _t(adapter.up.weight), "up_b": s_blk * adapter.up.bias.detach().double(),
        }
        shared = adapter.shared_module
        self.shared_heads = shared.attn.heads if shared is not None else 0
        if shared is None:
            weights.update(att2_w=o @ w_in, att2_b=b_o @ w_in + b_in)
        else:
            w1, b1 = _t(shared.l1.weight), shared.l1.bias.detach().double()
            w2, b2 = _t(shared.l2.weight), shared.l2.bias.detach().double()
            w64, b64 = _t(shared.attn.in_proj_weight), shared.attn.in_proj_bias.detach().double()
            o64, bo64 = _t(shared.attn.out_proj.weight), shared.attn.out_proj.bias.detach().double()
            s_s = sig(shared.gate)
            keep = torch.eye(w1.shape[0], dtype=torch.float64) + (1 - s_s) * (w1 @ w2)  # a ↦ S(a)'s part in a
            s_bias = b_o @ keep + s_s * (bo64 @ w2) + (1 - s_s) * (b1 @ w2) + b2
            weights.update(
                shared_w=o @ w1 @ w64, shared_b=(b_o @ w1 + b1) @ w64 + b64,
                att2_w=torch.cat([o @ keep, s_s * (o64 @ w2)]) @ w_in, att2_b=s_bias @ w_in + b_in)
        for name, value in weights.items():
            self.register_buffer(name, value.to(dtype).contiguous(), persistent=False)

    def _attention(self, x: Tensor, weight: Tensor, bias: Tensor, heads: int) -> Tensor:
        return (attention if self.fused else attention_math)(x, weight, bias, heads, False)

    def forward(self, h: Tensor, x: Optional[Tensor] = None, gamma: Optional[Tensor] = None,
                seq_first: bool = False) -> Tensor:
        z = F.gelu(h @ self.down_w + self.down_b)
        zb = z.transpose(0, 1) if seq_first else z  # attention wants (N, L, C)
        t1 = self._attention(zb, self.att1_w, self.att1_b, self.heads)
        if self.shared_heads:
            ts = self._attention(t1, self.shared_w, self.shared_b, self.shared_heads)
            t1 = torch.cat([t1, ts], dim=-1)
        t2 = self._attention(t1, self.att2_w, self.att2_b, self.heads)
        t2 = t2.transpose(0, 1) if seq_first else t2
        m = z * self.mix_gate + (t2 @ self.out_w + self.out_b)
        y = h + (m @ self.up_w + self.up_b)
        if gamma is not None:
            y = y * gamma
        return y if x is None else x + y

    def extra_repr(self) -> str:
        return f"fused={self.fused}, shared={bool(self.shared_heads)}"


def fold_adapters(model: nn.Module, fused: bool = True) -> int:
    """Replace every :class:`HarMAAdapter` of ``model`` (in place) by its :class:`FoldedAdapter`.

    Only for an export's private copy: the folded model cannot be trained or saved as adapters.
    Returns how many adapters were folded. All are folded before any is replaced, because an
    image-tower adapter reads the text tower's shared sub-adapter (``share="both"``).
    """
    owners = [(module, module._modules["harma"]) for module in model.modules()
              if isinstance(module._modules.get("harma"), HarMAAdapter)]
    folded = [(owner, FoldedAdapter(adapter, fused)) for owner, adapter in owners]
    for owner, module in folded:
        owner._modules["harma"] = module
        mlp = getattr(owner, "mlp", None)
        if isinstance(getattr(mlp, "_harma_adapter", None), tuple):  # timm / HF: the MLP calls the adapter
            mlp._harma_adapter = (module,)
    return len(folded)
