"""The fast training path for patched models (DESIGN §3 item 7): a frozen backbone that keeps
only what input-gradients need.

``enable_fast_path(model)`` switches every patched block whose structure is the standard one
to ``fast_block_forward``:

    y = ln_1(x);  x = x + ls_1(SDPA(q, k, v)·W_oᵀ)        (fused attention; is_causal in the text tower)
    h = FrozenMLP(ln_2(x))                              (saves its input only)
    x = adapter(h, x)                                    (fused kernels: x + ls_2(h + σ(g)·A(h)))

- The backbone is frozen, so its linears need no weight gradients: ``FrozenMLP`` saves the
  MLP input (M×d) instead of the GELU input (M×4d, the largest activation of a block) and
  recomputes ``c_fc`` in backward — one GEMM of work for 3·M·d of memory per block.
- Attention reads q, k, v straight from the packed in-projection into fused SDPA; the text
  tower's causal float mask becomes ``is_causal`` (checked once, here, against the model's).
- Under autocast the residual stream is kept in bf16 (open_clip's stays fp32), halving what
  the LayerNorms save. The bf16 copies of the frozen weights are made once and kept
  (:func:`frozen_cast`): autocast caches casts of trainable leaves only, so it would copy
  every frozen weight on every call (~780 casts per ViT-B-32 step).

timm and Hugging Face blocks keep their own forward (their attention already runs fused SDPA);
there the fast path is ``FrozenMLP`` alone, for plain two-layer MLPs (timm ``Mlp``, HF
``CLIPMLP``/``SiglipMLP``); gated MLPs (EVA's SwiGLU) keep the reference.

Blocks of another structure (custom attention variants, sequence-first stacks) keep the
reference forward; the function computed is the same either way (tested against it).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .families import mlp_activation
from .patching import HarMABlockMixin, HarMAMLPMixin, find_towers, is_patched

Tensor = torch.Tensor


class FrozenMLP(torch.autograd.Function):
    """``c_proj(act(c_fc(y)))`` with frozen weights: saves ``y`` only, recomputes the hidden layer."""

    @staticmethod
    def forward(ctx, y: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor], act: nn.Module):
        hidden = act(F.linear(y, w1, b1))
        out = F.linear(hidden, w2, b2)
        ctx.save_for_backward(y, w1, b1, w2)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        y, w1, b1, w2 = ctx.saved_tensors
        grad_hidden = grad_out.matmul(w2.to(grad_out.dtype))
        with torch.enable_grad():
            pre = F.linear(y, w1, b1).detach().requires_grad_()
            (grad_pre,) = torch.autograd.grad(ctx.act(pre), pre, grad_hidden.to(pre.dtype))
        grad_y = grad_pre.matmul(w1.to(grad_pre.dtype))
        return grad_y.to(y.dtype), None, None, None, None, None


def frozen_cast(weight: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``weight.to(dtype)``, made once per weight and kept beside it while the weight is unchanged.

    For frozen backbone weights only. The copy is keyed on the storage, the dtype and the
    in-place version counter, so ``load_state_dict``, ``copy_`` or ``.to(device)`` make a new
    one; the memory it costs is that of the model in ``dtype`` (about 300 MB for a ViT-B-32 in bf16).
    """
    if weight is None or weight.dtype == dtype:
        return weight
    # compiled: the graph holds its own casts (and cache bookkeeping would break it); trainable:
    # autocast's business; inference tensors: no version counter to tell a changed weight by
    if torch.compiler.is_compiling() or weight.requires_grad or weight.is_inference():
        return weight.to(dtype)
    key = (weight.data_ptr(), weight.device, weight._version, dtype)
    cached = getattr(weight, "_harma_cast", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(dtype))
        weight._harma_cast = cached
    return cached[1]


def _frozen_linears(fc1: nn.Linear, fc2: nn.Linear, act, y: Tensor) -> Tensor:
    """``fc2(act(fc1(y)))`` through ``FrozenMLP``, in the autocast dtype when autocast is on."""
    device = y.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else y.dtype
    w1, w2 = frozen_cast(fc1.weight, dtype), frozen_cast(fc2.weight, dtype)
    b1, b2 = frozen_cast(fc1.bias, dtype), frozen_cast(fc2.bias, dtype)
    with torch.autocast(device, enabled=False):
        return FrozenMLP.apply(y.to(dtype), w1, b1, w2, b2, act)


def _frozen_mlp(mlp: nn.Module, y: Tensor) -> Tensor:
    return _frozen_linears(mlp.c_fc, mlp.c_proj, mlp.gelu, y)


def frozen_mlp_forward(mlp: nn.Module, y: Tensor) -> Tensor:
    """A plain timm / HF MLP (``fc1 → act → fc2``) through ``FrozenMLP``."""
    return _frozen_linears(mlp.fc1, mlp.fc2, mlp_activation(mlp), y)


def _attention(attn: nn.Module, y: Tensor, causal: bool) -> Tensor:
    n, length, d = y.shape
    heads = attn.num_heads
    qkv = F.linear(y, frozen_cast(attn.in_proj_weight, y.dtype), frozen_cast(attn.in_proj_bias, y.dtype))
    q, k, v = qkv.view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.linear(out.transpose(1, 2).reshape(n, length, d), frozen_cast(attn.out_proj.weight, y.dtype),
                    frozen_cast(attn.out_proj.bias, y.dtype))


def _layer_norm(ln: nn.Module, x: Tensor) -> Tensor:
    # outside autocast, whose CUDA policy runs layer_norm in fp32 and would save an fp32 copy of
    # the input; the kernel accumulates its statistics in fp32 either way
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, ln.normalized_shape, frozen_cast(ln.weight, x.dtype), frozen_cast(ln.bias, x.dtype),
                            ln.eps)


def fast_block_forward(block: nn.Module, x: Tensor) -> Tensor:
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # bf16 residual stream
    x = x + block.ls_1(_attention(block.attn, _layer_norm(block.ln_1, x), block._harma_causal))
    return block._harma_residual(x, _frozen_mlp(block.mlp, _layer_norm(block.ln_2, x)))


def _fast_capable(block: nn.Module) -> bool:
    """The standard block: plain attention with packed projections, plain MLP, batch-first, frozen."""
    attn, mlp = block.attn, block.mlp
    if block._harma_seq_first or hasattr(block, "ln_attn") or not hasattr(attn, "num_heads"):
        return False
    if isinstance(attn, nn.MultiheadAttention):
        plain_attn = attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    else:
        plain_attn = all(getattr(attn, a, None) is None for a in ("logit_scale", "head_scale")) and \
            isinstance(getattr(attn, "ln_q", nn.Identity()), nn.Identity) and \
            isinstance(getattr(attn, "ln_inner", nn.Identity()), nn.Identity)
    plain_mlp = set(dict(mlp.named_children())) == {"c_fc", "gelu", "c_proj"}
    plain_norms = all(type(getattr(block, n)) in (nn.LayerNorm,) or type(getattr(block, n)).__name__ in
                      ("LayerNorm", "LayerNormFp32") for n in ("ln_1", "ln_2"))
    return plain_attn and plain_mlp and plain_norms and _frozen(block)


def _frozen(block: nn.Module) -> bool:
    return not any(p.requires_grad for n, p in block.named_parameters() if not n.startswith("harma."))


def _mask_is_causal(mask: Optional[Tensor], length: int) -> bool:
    if mask is None:
        return False
    causal = torch.full((length, length), float("-inf"), device=mask.device).triu(1)
    return mask.shape == causal.shape and torch.equal(mask.float(), causal)


def enable_fast_path(model: nn.Module, enabled: bool = True) -> int:
    """Route every standard patched block through ``fast_block_forward``; returns how many."""
    if not is_patched(model):
        raise RuntimeError("the fast path is for patched models; call harma_fast.patch(model) first")
    towers = find_towers(model)
    text_mask = getattr(model, "attn_mask", getattr(getattr(model, "text", None), "attn_mask", None))
    count = 0
    for name, tower in towers.items():
        causal = False
        if name == "text" and tower.prefix.endswith("resblocks"):  # open_clip: the model holds the mask
            causal = _mask_is_causal(text_mask, text_mask.shape[0] if text_mask is not None else 0)
            if text_mask is not None and not causal:
                continue  # an unusual mask: keep the reference forward, which applies it
        for block in tower.blocks:
            if isinstance(block, HarMABlockMixin):
                use = enabled and _fast_capable(block)
                block._harma_fast, block._harma_causal = use, causal
                count += use
            elif isinstance(getattr(block, "mlp", None), HarMAMLPMixin):
                use = enabled and mlp_activation(block.mlp) is not None and _frozen(block)
                block.mlp._harma_fast = use
                count += use
    return count
