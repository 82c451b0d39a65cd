"""Where each model family keeps the pieces HarMA needs (DESIGN §5), found by structure.

HarMA's place is defined by the block, not by the library: the adapter reads the MLP's output
``h`` and the block adds ``ls_2(h + σ(g_blk)·A(h))`` to its residual stream. A family here is
the set of attributes a block must have (first match wins, then a clear error), and the
attribute paths where a model keeps its image and text block stacks.

- open_clip ``Transformer`` blocks (``ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj``): harma_fast runs
  the whole block (so the fused output op can also take the residual add and LayerScale).
- timm ViT / EVA blocks (``norm1, attn, norm2, mlp.fc2``; LayerScale ``ls2`` or ``gamma_2``) and
  Hugging Face ``CLIPEncoderLayer`` / ``SiglipEncoderLayer`` (``layer_norm1, self_attn,
  layer_norm2, mlp.fc1, mlp.fc2``, no LayerScale): the block's own forward stays, with its own
  attention (EVA's rotary embeddings, HF's attention backends), and the MLP's output becomes
  ``h + σ(g_blk)·A(h)`` — the block then applies its LayerScale and residual add to that, which
  is DESIGN §1's ``x + ls_2(h + σ(g_blk)·A(h))`` without re-implementing any family's forward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from torch import nn

from .errors import UnsupportedModelError

SUPPORTED = ("ViT CLIP models: open_clip CLIP / CustomTextCLIP / CoCa (model.visual.transformer, "
             "model.transformer or model.text.transformer; e.g. ViT-B-32, ViT-L-14), open_clip models with a "
             "timm ViT or EVA image tower (model.visual.trunk.blocks; SigLIP, SigLIP 2, EVA02-CLIP), and Hugging "
             "Face CLIPModel / SiglipModel (and their vision- or text-only models)")


@dataclass(frozen=True)
class Family:
    name: str
    needs: Tuple[str, ...]   # dotted attributes every block of the family has
    wraps_mlp: bool          # True: HarMA goes on the MLP's output; False: harma_fast runs the block

    def missing(self, block: nn.Module) -> Tuple[str, ...]:
        return tuple(path for path in self.needs if _get(block, path) is None)


OPEN_CLIP = Family("open_clip", ("ln_1", "attn", "ln_2", "mlp", "mlp.c_fc", "mlp.c_proj"), wraps_mlp=False)
TIMM = Family("timm", ("norm1", "attn", "norm2", "mlp", "mlp.fc2"), wraps_mlp=True)
HF = Family("hf", ("layer_norm1", "self_attn", "layer_norm2", "mlp", "mlp.fc1", "mlp.fc2"), wraps_mlp=True)
FAMILIES = (OPEN_CLIP, TIMM, HF)

# A block with any of these attends to another sequence; HarMA adapts self-attention towers.
_CROSS_ATTENTION = ("ln_1_kv", "cross_attn", "encoder_attn", "crossattention")
# Post-norm blocks normalise the MLP output before the residual add (x + norm(mlp(x))): the same
# attributes as a pre-norm block, but DESIGN §1 has no place for the adapter there. Structure
# cannot tell them apart, so these few are known by name.
_POST_NORM = ("ResPostBlock", "EvaBlockPostNorm")

# Attribute paths of the block stacks, in the order they are tried, each with an attribute the
# model must also have (HF's single-tower models, e.g. CLIPVisionModel, keep ``encoder.layers``
# at the top: their embeddings say which tower it is).
IMAGE_STACKS = (("visual.transformer.resblocks", None), ("visual.trunk.blocks", None),
                ("vision_model.encoder.layers", None), ("encoder.layers", "embeddings.patch_embedding"))
# open_clip's CLIP keeps its text blocks at the top (``transformer``) beside ``token_embedding``;
# a VisionTransformer alone has ``transformer.resblocks`` too, and is no text tower
TEXT_STACKS = (("transformer.resblocks", "token_embedding"), ("text.transformer.resblocks", None),
               ("text_model.encoder.layers", None), ("encoder.layers", "embeddings.token_embedding"))


def _get(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def block_family(block: nn.Module, where: str) -> Family:
    """The family of one block (first match wins), or an error naming what it lacks."""
    cross = [a for a in _CROSS_ATTENTION if getattr(block, a, None) is not None]
    if cross:
        raise UnsupportedModelError(f"{where} ({type(block).__name__}) is a cross-attention block ({cross[0]}); "
                                    "HarMA adapts self-attention towers only.")
    if type(block).__name__ in _POST_NORM:
        raise UnsupportedModelError(f"{where} is a post-norm block ({type(block).__name__}: x + norm(mlp(x))); "
                                    f"HarMA sits on the MLP output before a pre-norm block's residual add. "
                                    f"Supported: {SUPPORTED}.")
    for family in FAMILIES:
        if not family.missing(block):
            return family
    lacks = "; ".join(f"{', '.join(f.missing(block))} ({f.name} block)" for f in FAMILIES)
    raise UnsupportedModelError(f"{where} ({type(block).__name__}) is not a transformer block harma_fast can "
                                f"patch: it lacks {lacks}. Supported: {SUPPORTED}.")


def block_width(block: nn.Module, family: Family) -> int:
    """The width ``d`` of the block's residual stream (= the MLP's output width)."""
    if family is OPEN_CLIP:
        return block.mlp.c_fc.in_features
    return block.mlp.fc2.out_features


def mlp_activation(mlp: nn.Module) -> Optional[nn.Module]:
    """The activation of a plain two-layer MLP (timm ``Mlp``, HF ``CLIPMLP``), None for anything else."""
    children = dict(mlp.named_children())
    act = children.get("act", children.get("activation_fn"))
    rest = set(children) - {"fc1", "fc2", "act", "activation_fn", "drop1", "drop2", "norm"}
    plain = (isinstance(act, nn.Module) and isinstance(children.get("fc1"), nn.Linear)
             and isinstance(children.get("fc2"), nn.Linear) and not rest
             # timm's GluMlp (EVA's packed SwiGLU without scale_mlp) has these very children but
             # splits fc1's output in two halves, gate and value: fc2 reads half of fc1's width
             and children["fc1"].out_features == children["fc2"].in_features
             and isinstance(children.get("norm", nn.Identity()), nn.Identity)
             and all(getattr(children.get(d), "p", 0.0) == 0.0 for d in ("drop1", "drop2")))
    return act if plain else None


def find_stack(model: nn.Module, paths: Tuple[Tuple[str, Optional[str]], ...]) -> Optional[Tuple[str, nn.Module]]:
    for path, also in paths:
        stack = _get(model, path)
        if also is not None and _get(model, also) is None:
            continue
        if isinstance(stack, (nn.ModuleList, nn.Sequential)) and len(stack):
            return path, stack
    return None


def why_no_tower(model: nn.Module, tower: str) -> str:
    """Why ``model`` has no adaptable ``tower`` (for the warning or the error)."""
    if tower == "image":
        visual = getattr(model, "visual", None)
        trunk = getattr(visual, "trunk", None)
        if trunk is not None:
            return f"the image tower is a timm {type(trunk).__name__} without transformer blocks (trunk.blocks)"
        if visual is not None:
            return f"the image tower is a {type(visual).__name__}, not a ViT"
        return "the model has no image tower"
    text = getattr(model, "text", None)
    if text is not None:
        return f"the text tower is a {type(text).__name__}, not a transformer harma_fast knows (e.g. a HF text model)"
    return "the model has no text tower"


__all__ = ["Family", "FAMILIES", "OPEN_CLIP", "TIMM", "HF", "SUPPORTED", "UnsupportedModelError", "block_family",
           "block_width", "mlp_activation", "find_stack", "why_no_tower", "IMAGE_STACKS", "TEXT_STACKS"]
