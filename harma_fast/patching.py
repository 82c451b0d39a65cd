"""``patch()``: put a HarMA adapter in every transformer block of a ViT CLIP.

Blocks are recognised by what they have (``harma_fast.families``: open_clip's ``ln_1, attn,
ln_2, mlp.c_fc, mlp.c_proj``; timm's ``norm1, attn, norm2, mlp.fc2``; Hugging Face's
``layer_norm1, self_attn, layer_norm2, mlp.fc1, mlp.fc2``), not by class. A patched block keeps
every stock parameter under its stock name and gains one child, ``harma``.

- open_clip blocks: the block's class is swapped for a subclass whose forward is
  ``x = x + ls_1(attn(ln_1(x))); h = mlp(ln_2(x)); x = x + ls_2(h + σ(g_blk) · A(h))``.
- timm and Hugging Face blocks keep their forward; their MLP's class is swapped for a subclass
  that returns ``h + σ(g_blk) · A(h)``, to which the block applies its LayerScale and residual.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Dict, Iterator, List, Optional, Tuple

from torch import nn

from .backend import check_backend
from .config import HarMAConfig
from .families import (IMAGE_STACKS, SUPPORTED, TEXT_STACKS, Family, UnsupportedModelError,
                       block_family, block_width, find_stack, why_no_tower)
from .mixins import mixed_class
from .modules import HarMAAdapter, SharedSubAdapter


# --------------------------------------------------------------------------------------------
# open_clip blocks: harma_fast runs the block
# --------------------------------------------------------------------------------------------
def _is_mha_attention(attn: nn.Module) -> bool:
    return isinstance(attn, nn.MultiheadAttention)


def _is_sdpa_attention(attn: nn.Module) -> bool:
    # open_clip's own Attention (and its SDPA successor): packed in_proj_weight, out_proj,
    # called as attn(x, attn_mask=...).
    return hasattr(attn, "in_proj_weight") and hasattr(attn, "out_proj")


_ATTENTION_KINDS = (("mha", _is_mha_attention), ("sdpa", _is_sdpa_attention))


def _block_kind(block: nn.Module, where: str) -> str:
    """``"mha"``/``"sdpa"`` (open_clip block, by attention) or ``"mlp"`` (HarMA on the MLP output)."""
    family = block_family(block, where)
    if family.wraps_mlp:
        return "mlp"
    for kind, matches in _ATTENTION_KINDS:
        if matches(block.attn):
            return kind
    raise UnsupportedModelError(
        f"{where}.attn is a {type(block.attn).__name__}, which harma_fast does not know how to call; "
        "supported: nn.MultiheadAttention and open_clip's Attention (in_proj_weight + out_proj).")


class HarMABlockMixin:
    """Forward of a patched open_clip block; mixed in front of the block's own class."""

    harma: HarMAAdapter
    _harma_kind: str
    _harma_seq_first: bool
    _harma_fast: bool = False
    _harma_causal_mask = None  # (module, attribute) of the model's causal mask: harma_fast.fast

    def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
        if k_x is not None or v_x is not None:
            raise NotImplementedError("a HarMA-patched block does self-attention only (k_x/v_x given)")
        if self._harma_fast:  # harma_fast.fast.enable_fast_path: same function, frozen-backbone plumbing
            return _fast().fast_block_forward(self, q_x, attn_mask)
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


def _fast():
    from . import fast  # imported on use: fast.py builds on this module

    return fast


# --------------------------------------------------------------------------------------------
# timm and Hugging Face blocks: HarMA on the MLP's output
# --------------------------------------------------------------------------------------------
class HarMAMLPMixin:
    """Forward of the MLP of a patched timm / HF block: ``h + σ(g_blk) A(h)``, ``h`` the MLP's output.

    The adapter is registered on the block (``block.harma``, so keys read ``…blocks.i.harma.*``
    in every family); the MLP holds a reference outside the module tree.
    """

    _harma_adapter: Tuple[HarMAAdapter]
    _harma_fast: bool = False

    def forward(self, y, *args, **kwargs):
        # harma_fast.fast.enable_fast_path: a frozen MLP that saves its input only (while it is frozen)
        if self._harma_fast and _fast().mlp_frozen(self):
            h = _fast().frozen_mlp_forward(self, y)
        else:
            h = super().forward(y, *args, **kwargs)
        return self._harma_adapter[0](h)


def _patched_class(cls: type, mixin: type = HarMABlockMixin) -> type:
    return mixed_class(cls, mixin, prefix="HarMA")


# --------------------------------------------------------------------------------------------
# towers
# --------------------------------------------------------------------------------------------
@dataclass
class Tower:
    name: str          # "image" | "text"
    prefix: str        # attribute path of the tower's block stack, e.g. "visual.transformer.resblocks"
    stack: nn.Module   # the ModuleList / Sequential of blocks
    seq_first: bool

    @property
    def blocks(self) -> List[nn.Module]:
        return list(self.stack)

    @property
    def family(self) -> Family:
        return block_family(self.stack[0], f"{self.prefix}.0")

    @property
    def width(self) -> int:
        return block_width(self.stack[0], self.family)


def _tower(model: nn.Module, name: str, paths) -> Optional[Tower]:
    found = find_stack(model, paths)
    if found is None:
        return None
    prefix, stack = found
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    return Tower(name, prefix, stack, seq_first=not getattr(parent, "batch_first", True))


def _scan_towers(model: nn.Module) -> Tuple[Dict[str, Tower], Dict[str, str]]:
    """``(adaptable towers, {tower: why not} for the others)``; raises for what is no CLIP at all."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"harma_fast.patch expects an open_clip or Hugging Face CLIP model "
                                    f"(CLIP, SigLIP), got {type(model).__name__}. Supported: {SUPPORTED}.")
    visual = getattr(model, "visual", None)
    if visual is not None and hasattr(visual, "layer1") and hasattr(visual, "attnpool"):
        # OpenAI's ResNet CLIPs: refused outright rather than silently adapted in the text tower only
        raise UnsupportedModelError(f"the image tower is a ResNet ({type(visual).__name__}), not a ViT; HarMA adapts "
                                    f"ViT CLIP models only. Supported: {SUPPORTED}.")
    if type(model).__module__.startswith("open_clip") and type(model).__name__ in ("VisionTransformer",
                                                                                   "TextTransformer"):
        raise UnsupportedModelError(f"harma_fast.patch takes the whole CLIP model, got its {type(model).__name__} "
                                    "alone (the towers share the S sub-adapters, and the model records its layout): "
                                    "patch(model), with HarMAConfig(towers=('image',)) or ('text',) to adapt one tower")
    towers, missing = {}, {}
    for name, paths in (("image", IMAGE_STACKS), ("text", TEXT_STACKS)):
        tower = _tower(model, name, paths)
        if tower is None:
            missing[name] = why_no_tower(model, name)
        else:
            towers[name] = tower
    if not towers:
        if visual is None and not any(hasattr(model, a) for a in ("vision_model", "text_model", "encode_text")):
            raise UnsupportedModelError(f"harma_fast.patch expects an open_clip or Hugging Face CLIP model "
                                        f"(CLIP, SigLIP), got {type(model).__name__}. Supported: {SUPPORTED}.")
        raise UnsupportedModelError(f"{type(model).__name__} has no tower harma_fast can adapt: "
                                    f"{'; '.join(missing.values())}. Supported: {SUPPORTED}.")
    return towers, missing


def find_towers(model: nn.Module) -> Dict[str, Tower]:
    """The adaptable image and text block stacks of a model (clear errors when there are none)."""
    return _scan_towers(model)[0]


def _width(block: nn.Module) -> int:
    return block_width(block, block_family(block, type(block).__name__))


def _reference_weight(block: nn.Module):
    """A backbone weight of the block: the adapter is created on its device, in its dtype."""
    return next(block.mlp.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a user's wrappers: ``DistributedDataParallel`` / ``DataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``), whose parameter names carry a prefix (``module.``,
    ``_orig_mod.``) that adapter files and backbone fingerprints must not."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module) and \
                type(model).__name__ == "OptimizedModule":
            model = model._orig_mod
        else:
            return model


def is_patched(model: nn.Module) -> bool:
    return getattr(unwrap(model), "harma_config", None) is not None


def _adapter_of(module: nn.Module) -> Optional[HarMAAdapter]:
    adapter = module._modules.get("harma") if isinstance(module, nn.Module) else None
    return adapter if isinstance(adapter, HarMAAdapter) else None


def iter_adapters(model: nn.Module) -> Iterator[Tuple[str, HarMAAdapter]]:
    """``(qualified block name, adapter)`` for every patched block, image tower first."""
    for name, module in model.named_modules():
        adapter = _adapter_of(module)
        if adapter is not None:
            yield name, adapter


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def patch(model: nn.Module, config: Optional[HarMAConfig] = None, backend: str = "auto") -> nn.Module:
    """Insert HarMA adapters into every block of both towers, in place; freeze the backbone.

    A model with one adaptable tower only (a ConvNeXt image tower, a vision-only HF model) gets
    that one adapted, with a warning; ``model.harma_config.towers`` then names it alone.

    Returns ``model``. After patching only adapter weights and gates are trainable
    (``harma_fast.trainable_parameters``). A freshly patched model computes exactly what the
    unpatched one computes (the up-projections start at zero).
    """
    config = config or HarMAConfig.paper()
    check_backend(backend)
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        # DDP registered the parameters it synchronises when it was built: adapters added now
        # would train apart on every rank
        raise RuntimeError(f"harma_fast.patch got a {type(model).__name__}: patch the model first, then wrap "
                           "it (harma_fast.patch(model); ddp = DistributedDataParallel(model, ...))")
    given, model = model, unwrap(model)  # a wrapper given is returned
    if is_patched(model):
        raise RuntimeError("model is already patched with HarMA adapters "
                           f"({model.harma_config}); call harma_fast.unpatch(model) first, or "
                           "harma_fast.set_backend(model, ...) to switch backend")
    inner = [name for name, m in model.named_modules() if isinstance(m, (HarMABlockMixin, HarMAMLPMixin))]
    if inner:
        raise RuntimeError(f"blocks of this model are already patched ({inner[0]}{' and more' if len(inner) > 1 else ''})"
                           ": a part of it was patched on its own; call harma_fast.unpatch on that part first")
    towers, missing = _scan_towers(model)
    if config.share == "text" and "text" not in config.towers:
        raise ValueError("HarMAConfig(share='text') puts S in the text tower, but towers excludes 'text'")
    adapted = tuple(t for t in config.towers if t in towers)
    skipped = [t for t in config.towers if t not in towers]
    if not adapted:
        raise UnsupportedModelError(f"none of the towers {config.towers} of {type(model).__name__} can be adapted: "
                                    f"{'; '.join(missing[t] for t in skipped)}. Supported: {SUPPORTED}.")
    if config.share == "text" and "text" not in adapted:
        raise UnsupportedModelError(f"HarMAConfig(share='text') puts S in the text tower, but {missing['text']}; "
                                    "use share='both' or 'none'")
    if skipped:
        warnings.warn(f"harma_fast.patch adapts the {' and '.join(adapted)} tower only: "
                      f"{'; '.join(missing[t] for t in skipped)}", UserWarning, stacklevel=2)
        config = replace(config, towers=adapted)  # what was adapted: saved with the adapters

    kinds = {t: [_block_kind(b, f"{towers[t].prefix}.{i}") for i, b in enumerate(towers[t].blocks)]
             for t in adapted}
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}

    # S modules: owned by the text tower when it is adapted (as in the released layout),
    # referenced by the image tower's layer of the same relative depth under share="both".
    # S works at the bottleneck width, so towers of different widths share it unchanged.
    owner = "text" if "text" in adapted else "image"
    if config.share == "both" and len(adapted) == 2:  # one S per layer serves both towers
        placed = {t: sorted({f"{str(w.dtype).replace('torch.', '')} on {w.device}"
                             for w in map(_reference_weight, towers[t].blocks)}) for t in adapted}
        if len(set(placed["image"] + placed["text"])) > 1:
            found = "; ".join(f"{t}: {', '.join(k)}" for t, k in placed.items())
            raise UnsupportedModelError(f"HarMAConfig(share='both') shares S between the towers, which are in "
                                        f"different dtypes or on different devices ({found}); cast or move the "
                                        "model as a whole first (model.to(dtype)), or use share='text' or 'none'")
    shared: List[SharedSubAdapter] = []
    if config.share != "none":
        for block in towers[owner].blocks:
            ref = _reference_weight(block)
            shared.append(SharedSubAdapter(config.bottleneck, config.shared_width, config.shared_heads,
                                           config.gate_init, device=ref.device, dtype=ref.dtype))

    for tower_name in adapted:
        tower = towers[tower_name]
        blocks = tower.blocks
        for i, block in enumerate(blocks):
            ref = _reference_weight(block)
            s, own = None, False
            if shared and tower_name == owner:
                s, own = shared[i], True
            elif shared and config.share == "both":
                s = shared[i * len(shared) // len(blocks)]
            adapter = HarMAAdapter(_width(block), config.bottleneck, config.heads, config.gate_init,
                                   shared=s, own_shared=own, device=ref.device, dtype=ref.dtype)
            kind = kinds[tower_name][i]
            if kind == "mlp":
                block.mlp.__class__ = _patched_class(type(block.mlp), HarMAMLPMixin)
                block.mlp._harma_adapter = (adapter,)
            else:
                block.__class__ = _patched_class(type(block))
            block.harma = adapter
            block._harma_kind = kind
            block._harma_seq_first = tower.seq_first

    for p in model.parameters():
        p.requires_grad_(False)
    for _, adapter in iter_adapters(model):
        for p in adapter.parameters():
            p.requires_grad_(True)
    model.harma_config = config
    model._harma_requires_grad = requires_grad
    set_backend(model, backend)
    return given


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every adapter of a patched model to ``"auto"``, ``"triton"`` or ``"reference"``."""
    check_backend(backend)
    given, model = model, unwrap(model)  # a wrapper given is returned
    if not is_patched(model):
        raise RuntimeError("model is not patched; call harma_fast.patch(model, backend=...) first")
    for _, adapter in iter_adapters(model):
        adapter.set_backend(backend)
    model.harma_backend = backend
    return given


def unpatch(model: nn.Module) -> nn.Module:
    """Remove every adapter and restore the original blocks and ``requires_grad`` flags."""
    given, model = model, unwrap(model)  # a wrapper given is returned
    if not is_patched(model):
        raise RuntimeError("model is not patched with HarMA adapters; nothing to unpatch")
    _fast().drop_casts(model)  # the fast path's bf16 copies of the backbone weights
    for _, module in list(model.named_modules()):
        if _adapter_of(module) is None:
            continue
        del module.harma
        del module._harma_kind, module._harma_seq_first
        module.__dict__.pop("_harma_fast", None)
        module.__dict__.pop("_harma_causal_mask", None)
        if isinstance(module, HarMABlockMixin):
            module.__class__ = module._harma_original_class
        if isinstance(module.mlp, HarMAMLPMixin):
            del module.mlp._harma_adapter
            module.mlp.__dict__.pop("_harma_fast", None)
            module.mlp.__class__ = module.mlp._harma_original_class
    for name, p in model.named_parameters():
        p.requires_grad_(model._harma_requires_grad.get(name, p.requires_grad))
    del model.harma_config, model._harma_requires_grad
    if hasattr(model, "harma_backend"):
        del model.harma_backend
    return given


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
