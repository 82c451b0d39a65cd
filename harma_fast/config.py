"""HarMA adapter configuration (DESIGN §1).

One dataclass describes every adapter of a patched model; it travels with adapter
checkpoints as metadata, so a file can only be loaded into a model patched the same way.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Tuple

SHARE_MODES = ("both", "text", "none")
TOWERS = ("image", "text")


@dataclass(frozen=True)
class HarMAConfig:
    """Shape and layout of the HarMA adapters.

    Attributes:
        bottleneck: width ``r`` of the adapter (down-projection output). Paper: 128.
        heads: heads of the adapter's self-attention over the ``L`` tokens (head width
            ``bottleneck / heads``; paper: 8 heads of 16).
        shared_width: width of the shared multimodal sub-adapter ``S`` (paper: ``r/2 = 64``).
        shared_heads: heads of ``S``'s attention (paper: 8 heads of 8).
        share: where ``S`` sits. ``"both"`` (paper, default): one ``S`` per layer, used by
            both towers. ``"text"``: ``S`` in the text tower only (the released
            checkpoints' layout). ``"none"``: no ``S``.
        gate_init: initial value of every gate logit (``g_blk``, ``g_a``, ``g_s``).
        towers: which towers get adapters, a subset of ``("image", "text")``.
    """

    bottleneck: int = 128
    heads: int = 8
    shared_width: int = 64
    shared_heads: int = 8
    share: str = "both"
    gate_init: float = 0.6
    towers: Tuple[str, ...] = field(default=TOWERS)

    def __post_init__(self):
        # Lists from JSON/YAML become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "towers", tuple(self.towers))
        if self.share not in SHARE_MODES:
            raise ValueError(f"HarMAConfig.share must be one of {SHARE_MODES}, got {self.share!r}")
        if not self.towers or any(t not in TOWERS for t in self.towers) or len(set(self.towers)) != len(self.towers):
            raise ValueError(f"HarMAConfig.towers must be a non-empty subset of {TOWERS}, got {self.towers!r}")
        for name, width, heads in (("bottleneck", self.bottleneck, self.heads),
                                   ("shared_width", self.shared_width, self.shared_heads)):
            if width <= 0 or heads <= 0 or width % heads:
                raise ValueError(f"HarMAConfig.{name}={width} must be a positive multiple of its heads ({heads})")

    @classmethod
    def paper(cls) -> "HarMAConfig":
        """The paper's model: ``S`` shared by both towers in every layer (the default)."""
        return cls(share="both")

    @classmethod
    def released(cls) -> "HarMAConfig":
        """The layout of the released code and checkpoints: ``S`` in the text tower only."""
        return cls(share="text")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "HarMAConfig":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown HarMAConfig fields {unknown}; this file was written by a newer harma_fast?")
        return cls(**data)

    def describe_difference(self, other: "HarMAConfig") -> str:
        """Human-readable list of the fields where two configs differ."""
        diffs = [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        return "; ".join(diffs)
