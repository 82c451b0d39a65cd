"""``patch()``: put a HarMA adapter in every transformer block of an open_clip CLIP.

Blocks are recognised by what they have (``ln_1``, ``attn``, ``ln_2``, ``mlp.c_fc``,
``mlp.c_proj``), not by class, so open_clip's ``nn.MultiheadAttention`` blocks, its SDPA
``Attention`` blocks, batch-first and sequence-first stacks are all handled. A patched block
keeps every stock parameter under its stock name; it gains one child, ``harma``, and its class
is swapped for a subclass whose forward is

    x = x + ls_1(attn(ln_1(x)))
    h = mlp(ln_2(x))
    x = x + ls_2(h + σ(g_blk) · A(h))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

from torch import nn

from .backend import check_backend
from .config import HarMAConfig
from .errors import UnsupportedModelError
from .modules import HarMAAdapter, SharedSubAdapter

SUPPORTED = ("open_clip CLIP / CustomTextCLIP / CoCa models with a ViT image tower "
             "(model.visual.transformer) and a transformer text tower (model.transformer or "
             "model.text.transformer), e.g. ViT-B-32, ViT-B-16, ViT-L-14")


# --------------------------------------------------------------------------------------------
# block kinds: first match wins, then a clear error
# --------------------------------------------------------------------------------------------
def _is_mha_attention(attn: nn.Module) -> bool:
    return isinstance(attn, nn.MultiheadAttention)


def _is_sdpa_attention(attn: nn.Module) -> bool:
    # open_clip's own Attention (and its SDPA successor): packed in_proj_weight, out_proj,
    # called as attn(x, attn_mask=...).
    return hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj")


_ATTENTION_KINDS = (("mha", _is_mha_attention), ("sdpa", _is_sdpa_attention))


def _block_kind(block: nn.Module, where: str) -> str:
    missing = [n for n in ("ln_1", "attn", "ln_2", "mlp") if not hasattr(block, n)]
    if not missing:
        missing = [f"mlp.{n}" for n in ("c_fc", "c_proj") if not hasattr(block.mlp, n)]
    if missing:
        raise UnsupportedModelError(
            f"{where} ({type(block).__name__}) is not a transformer block harma_fast can patch: "
            f"it lacks {', '.join(missing)}. Supported: {SUPPORTED}.")
    if hasattr(block, "ln_1_kv"):
        raise UnsupportedModelError(
            f"{where} is a cross-attention block; HarMA adapts self-attention towers only.")
    for kind, matches in _ATTENTION_KINDS:
        if matches(block.attn):
            return kind
    raise UnsupportedModelError(
        f"{where}.attn is a {type(block.attn).__name__}, which harma_fast does not know how to call; "
        "supported: nn.MultiheadAttention and open_clip's Attention (in_proj_weight + out_proj).")


class HarMABlockMixin:
    """Forward of a patched block; mixed in front of the block's own class."""

    harma: HarMAAdapter
    _harma_kind: str
    _harma_seq_first: bool
    _harma_fast: bool = False
    _harma_causal: bool = False

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise NotImplementedError("a HarMA-patched block does self-attention only (k_x/v_x given)")
        if self._harma_fast:  # harma_fast.fast.enable_fast_path: same function, frozen-backbone plumbing
            return _fast_forward()(self, q_x)
        y = self.ln_1(q_x)
        if self._harma_kind == "mha":
            mask = attn_mask.to(y.dtype) if attn_mask is not None else None
            y = self.attn(y, y, y, need_weights=False, attn_mask=mask)[0]
        else:
            y = self.attn(y, attn_mask=attn_mask)
        if hasattr(self, "ln_attn"):
            y = self.ln_attn(y)
        x = q_x + self.ls_1(y)
        return self._harma_residual(x, self.mlp(self.ln_2(x)))

    def _harma_residual(self, x, h):
        """``x + ls_2(h + σ(g_blk) A(h))``: the residual add and LayerScale go into the fused
        output op when ``ls_2`` is the identity or open_clip's LayerScale, else ``ls_2`` runs as is."""
        ls_2 = self.ls_2
        if isinstance(ls_2, nn.Identity):
            return self.harma(h, x=x, seq_first=self._harma_seq_first)
        if hasattr(ls_2, "gamma") and type(ls_2).__name__ == "LayerScale":
            return self.harma(h, x=x, gamma=ls_2.gamma, seq_first=self._harma_seq_first)
        return x + ls_2(self.harma(h, seq_first=self._harma_seq_first))


def _fast_forward():
    from .fast import fast_block_forward  # imported on use: fast.py builds on this module

    return fast_block_forward


_PATCHED_CLASSES: Dict[type, type] = {}


def _patched_class(cls: type) -> type:
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"HarMA{cls.__name__}", (HarMABlockMixin, cls), {"_harma_original_class": cls})
    return _PATCHED_CLASSES[cls]


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------
@dataclass
class Tower:
    name: str          # "image" | "text"
    prefix: str        # attribute path of the tower's Transformer, e.g. "visual.transformer"
    transformer: nn.Module

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self.transformer.resblocks)

    @property
    def seq_first(self) -> bool:
        return not getattr(self.transformer, "batch_first", True)


def find_towers(model: nn.Module) -> Dict[str, Tower]:
    """The image and text transformer stacks of an open_clip model (clear errors otherwise)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "visual") or not hasattr(model, "encode_text"):
        raise UnsupportedModelError(
            f"harma_fast.patch expects an open_clip CLIP model, got {type(model).__name__}. "
            f"Supported: {SUPPORTED}.")
    visual = model.visual
    if not hasattr(getattr(visual, "transformer", None), "resblocks"):
        kind = "a ResNet" if hasattr(visual, "layer1") else f"a {type(visual).__name__}"
        raise UnsupportedModelError(
            f"the image tower is {kind}, not a ViT; HarMA adapts ViT CLIP models only. "
            f"Supported: {SUPPORTED}.")
    if hasattr(getattr(model, "transformer", None), "resblocks"):
        text = Tower("text", "transformer", model.transformer)
    elif hasattr(getattr(getattr(model, "text", None), "transformer", None), "resblocks"):
        text = Tower("text", "text.transformer", model.text.transformer)
    else:
        kind = type(getattr(model, "text", None)).__name__
        raise UnsupportedModelError(
            f"the text tower ({kind}) is not an open_clip transformer (e.g. a Hugging Face text "
            f"model); HarMA adapts open_clip text transformers only. Supported: {SUPPORTED}.")
    return {"image": Tower("image", "visual.transformer", visual.transformer), "text": text}


def _width(block: nn.Module) -> int:
    return block.mlp.c_fc.in_features


def is_patched(model: nn.Module) -> bool:
    return getattr(model, "harma_config", None) is not None


def iter_adapters(model: nn.Module) -> Iterator[Tuple[str, HarMAAdapter]]:
    """``(qualified block name, adapter)`` for every patched block, image tower first."""
    for name, module in model.named_modules():
        if isinstance(module, HarMABlockMixin):
            yield name, module.harma


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def patch(model: nn.Module, config: Optional[HarMAConfig] = None, backend: str = "auto") -> nn.Module:
    """Insert HarMA adapters into every block of both towers, in place; freeze the backbone.

    Returns ``model``. After patching only adapter weights and gates are trainable
    (``harma_fast.trainable_parameters``). A freshly patched model computes exactly what the
    unpatched one computes (the up-projections start at zero).
    """
    config = config or HarMAConfig.paper()
    check_backend(backend)
    if is_patched(model):
        raise RuntimeError("model is already patched with HarMA adapters "
                           f"({model.harma_config}); call harma_fast.unpatch(model) first, or "
                           "harma_fast.set_backend(model, ...) to switch backend")
    towers = find_towers(model)
    if config.share == "text" and "text" not in config.towers:
        raise ValueError("HarMAConfig(share='text') puts S in the text tower, but towers excludes 'text'")

    kinds = {t: [_block_kind(b, f"{towers[t].prefix}.resblocks.{i}") for i, b in enumerate(towers[t].blocks)]
             for t in config.towers}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # S modules: owned by the text tower when it is adapted (as in the released layout),
    # referenced by the image tower's layer of the same relative depth under share="both".
    owner = "text" if "text" in config.towers else "image"
    shared: List[SharedSubAdapter] = []
    if config.share != "none":
        for block in towers[owner].blocks:
            ref = block.mlp.c_fc.weight
            shared.append(SharedSubAdapter(config.bottleneck, config.shared_width, config.shared_heads,
                                           config.gate_init, device=ref.device, dtype=ref.dtype))

    for tower_name in config.towers:
        tower = towers[tower_name]
        blocks = tower.blocks
        for i, block in enumerate(blocks):
            ref = block.mlp.c_fc.weight
            s, own = None, False
            if shared and tower_name == owner:
                s, own = shared[i], True
            elif shared and config.share == "both":
                s = shared[i * len(shared) // len(blocks)]
            adapter = HarMAAdapter(_width(block), config.bottleneck, config.heads, config.gate_init,
                                   shared=s, own_shared=own, device=ref.device, dtype=ref.dtype)
            block.__class__ = _patched_class(type(block))
            block.harma = adapter
            block._harma_kind = kinds[tower_name][i]
            block._harma_seq_first = tower.seq_first

    for p in model.parameters():
        p.requires_grad_(False)
    for _, adapter in iter_adapters(model):
        for p in adapter.parameters():
            p.requires_grad_(True)
    model.harma_config = config
    model._harma_requires_grad = requires_grad
    set_backend(model, backend)
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every adapter of a patched model to ``"auto"``, ``"triton"`` or ``"reference"``."""
    check_backend(backend)
    if not is_patched(model):
        raise RuntimeError("model is not patched; call harma_fast.patch(model, backend=...) first")
    for _, adapter in iter_adapters(model):
        adapter.set_backend(backend)
    model.harma_backend = backend
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the original blocks and ``requires_grad`` flags."""
    if not is_patched(model):
        raise RuntimeError("model is not patched with HarMA adapters; nothing to unpatch")
    for _, module in list(model.named_modules()):
        if isinstance(module, HarMABlockMixin):
            del module.harma
            del module._harma_kind, module._harma_seq_first
            module.__dict__.pop("_harma_fast", None)
            module.__dict__.pop("_harma_causal", None)
            module.__class__ = module._harma_original_class
    for name, p in model.named_parameters():
        p.requires_grad_(model._harma_requires_grad.get(name, p.requires_grad))
    del model.harma_config, model._harma_requires_grad
    if hasattr(model, "harma_backend"):
        del model.harma_backend
    return model


@dataclass(frozen=True)
class ParameterCount:
    total: int
    trainable: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} of {self.total:,} parameters ({self.percent:.2f}%)"


def trainable_parameters(model: nn.Module, *extra: nn.Module) -> ParameterCount:
    """Counts of all and of trainable parameters (shared tensors once).

    Pass the loss module as ``extra`` to count its temperature, as the released code does.
    """
    seen, total, trainable = set(), 0, 0
    for module in (model, *extra):
        for p in module.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return ParameterCount(total, trainable)
