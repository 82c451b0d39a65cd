"""The fast training path for patched models (DESIGN §3 item 7): a frozen backbone that keeps
only what input-gradients need.

``enable_fast_path(model)`` switches every patched block whose structure is the standard one
to ``fast_block_forward``:

    y = ln_1(x);  x = x + ls_1(SDPA(q, k, v)·W_oᵀ)        (fused attention; is_causal in the text tower)
    h = FrozenMLP(ln_2(x))                              (saves its input only)
    x = adapter(h, x)                                    (fused kernels: x + ls_2(h + σ(g)·A(h)))

- The backbone is frozen, so its linears need no weight gradients: ``FrozenMLP`` saves the
  MLP input (M×d) instead of the GELU input (M×4d, the largest activation of a block) and
  recomputes ``c_fc`` in backward — one GEMM of work for 3·M·d of memory per block. An MLP
  whose weights were unfrozen after ``enable_fast_path`` runs its own forward (:func:`mlp_frozen`).
- Attention reads q, k, v straight from the packed in-projection into fused SDPA. The mask a
  block is called with is applied as the reference applies it; the model's own causal mask
  (checked once, here) becomes ``is_causal``.
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

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from .families import mlp_activation
from .patching import HarMABlockMixin, HarMAMLPMixin, find_towers, is_patched, unwrap

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


# weight -> (key, copy): held beside the weight, not on it, so a pickled model (torch.save(model))
# does not carry the copies and they go with the weight; unpatch drops a model's (drop_casts)
_CASTS = WeakIdKeyDictionary()


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
    cached = _CASTS.get(weight)
    if cached is None or cached[0] != key:
        # made outside inference mode: a copy made under torch.inference_mode() (an evaluation
        # before training) is an inference tensor, which the next training step cannot save for backward
        with torch.inference_mode(False):
            cached = (key, weight.detach().to(dtype))
        _CASTS[weight] = cached
    return cached[1]


def drop_casts(model: nn.Module) -> None:
    """Forget the low-precision copies of ``model``'s weights (their memory comes back)."""
    for p in model.parameters():
        _CASTS.pop(p, None)


def _frozen_linears(fc1: nn.Linear, fc2: nn.Linear, act, y: Tensor) -> Tensor:
    """``fc2(act(fc1(y)))`` through ``FrozenMLP``, in the autocast dtype when autocast is on."""
    device = y.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else y.dtype
    w1, w2 = frozen_cast(fc1.weight, dtype), frozen_cast(fc2.weight, dtype)
    b1, b2 = frozen_cast(fc1.bias, dtype), frozen_cast(fc2.bias, dtype)
    with torch.autocast(device, enabled=False):
        return FrozenMLP.apply(y.to(dtype), w1, b1, w2, b2, act)


def mlp_frozen(mlp: nn.Module) -> bool:
    """Whether no weight of ``mlp`` trains, so that ``FrozenMLP`` (no weight gradients) may run it.

    ``enable_fast_path`` routes frozen blocks only, but weights may be unfrozen afterwards (to
    fine-tune the last blocks, say): such an MLP runs its own forward instead, which trains them.
    Checked per call, as it is a few flag reads (on which a compiled graph guards).
    """
    return not any(p.requires_grad for p in mlp.parameters())


def _frozen_mlp(mlp: nn.Module, y: Tensor) -> Tensor:
    return _frozen_linears(mlp.c_fc, mlp.c_proj, mlp.gelu, y)


def frozen_mlp_forward(mlp: nn.Module, y: Tensor) -> Tensor:
    """A plain timm / HF MLP (``fc1 → act → fc2``) through ``FrozenMLP``."""
    return _frozen_linears(mlp.fc1, mlp.fc2, mlp_activation(mlp), y)


def _sdpa_mask(block: nn.Module, attn_mask: Optional[Tensor], n: int, length: int,
               dtype: torch.dtype) -> Tuple[bool, Optional[Tensor]]:
    """``(is_causal, attn_mask)`` for SDPA: the mask the block was called with, read as its
    reference forward reads it (so any mask gives the same function on both paths)."""
    if attn_mask is None:
        return False, None
    holder = block._harma_causal_mask
    # the model's own causal mask, checked by value in enable_fast_path: fused causal attention.
    # Identity, not a value check, per call: no host sync, and a compiled graph guards on it;
    # any other mask (CoCa's per-batch class/padding mask, a caller's own) is applied as given.
    if holder is not None and attn_mask is getattr(holder[0], holder[1], None) and \
            attn_mask.shape == (length, length):
        return True, None
    if attn_mask.dtype == torch.bool and block._harma_kind == "sdpa":
        # open_clip's Attention reads True as masked out; nn.MultiheadAttention gets the block's
        # plain .to(dtype) (True adds 1), as open_clip's own block does
        attn_mask = torch.zeros_like(attn_mask, dtype=dtype).masked_fill_(attn_mask, float("-inf"))
    attn_mask = attn_mask.to(dtype)
    if attn_mask.ndim == 3:  # (N·heads, L, L), as both attention modules take it
        attn_mask = attn_mask.reshape(n, block.attn.num_heads, length, length)
    return False, attn_mask


def _attention(block: nn.Module, y: Tensor, attn_mask: Optional[Tensor]) -> Tensor:
    attn = block.attn
    n, length, d = y.shape
    heads = attn.num_heads
    qkv = F.linear(y, frozen_cast(attn.in_proj_weight, y.dtype), frozen_cast(attn.in_proj_bias, y.dtype))
    q, k, v = qkv.view(n, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    causal, mask = _sdpa_mask(block, attn_mask, n, length, y.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return F.linear(out.transpose(1, 2).reshape(n, length, d), frozen_cast(attn.out_proj.weight, y.dtype),
                    frozen_cast(attn.out_proj.bias, y.dtype))


def _layer_norm(ln: nn.Module, x: Tensor) -> Tensor:
    # outside autocast, whose CUDA policy runs layer_norm in fp32 and would save an fp32 copy of
    # the input; the kernel accumulates its statistics in fp32 either way
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, ln.normalized_shape, frozen_cast(ln.weight, x.dtype), frozen_cast(ln.bias, x.dtype),
                            ln.eps)


def fast_block_forward(block: nn.Module, x: Tensor, attn_mask: Optional[Tensor] = None) -> Tensor:
    if torch.is_autocast_enabled(x.device.type):
        x = x.to(torch.get_autocast_dtype(x.device.type))  # bf16 residual stream
    x = x + block.ls_1(_attention(block, _layer_norm(block.ln_1, x), attn_mask))
    y = _layer_norm(block.ln_2, x)
    return block._harma_residual(x, _frozen_mlp(block.mlp, y) if mlp_frozen(block.mlp) else block.mlp(y))


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
    model = unwrap(model)
    if not is_patched(model):
        raise RuntimeError("the fast path is for patched models; call harma_fast.patch(model) first")
    towers = find_towers(model)
    count = 0
    for name, tower in towers.items():
        causal_mask = None
        if name == "text" and tower.prefix.endswith("resblocks"):  # open_clip: the model holds the mask
            holder = model if hasattr(model, "attn_mask") else getattr(model, "text", None)
            mask = getattr(holder, "attn_mask", None)
            if mask is not None and _mask_is_causal(mask, mask.shape[0]):
                # a reference to where the mask lives, not the tensor: .to(device) replaces the tensor
                causal_mask = (holder, "attn_mask")
        for block in tower.blocks:
            if isinstance(block, HarMABlockMixin):
                use = enabled and _fast_capable(block)
                block._harma_fast, block._harma_causal_mask = use, causal_mask if use else None
                count += use
            elif isinstance(getattr(block, "mlp", None), HarMAMLPMixin):
                use = enabled and mlp_activation(block.mlp) is not None and _frozen(block)
                block.mlp._harma_fast = use
                count += use
    return count
