"""HarMA adapter configuration (DESIGN §1), and the checks every settings dataclass shares.

One dataclass describes every adapter of a patched model; it travels with adapter
checkpoints as metadata, so a file can only be loaded into a model patched the same way.
``check_settings`` type- and range-checks a settings dataclass (``TrainConfig``) field by
field, so a bad value is refused when it is given, not as a traceback deep inside a run.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Tuple

from .errors import ConfigError

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
            raise ConfigError(f"HarMAConfig.share must be one of {SHARE_MODES}, got {self.share!r}")
        if not self.towers or any(t not in TOWERS for t in self.towers) or len(set(self.towers)) != len(self.towers):
            raise ConfigError(f"HarMAConfig.towers must be a non-empty subset of {TOWERS}, got {self.towers!r}")
        for name, width, heads in (("bottleneck", self.bottleneck, self.heads),
                                   ("shared_width", self.shared_width, self.shared_heads)):
            if width <= 0 or heads <= 0 or width % heads:
                raise ConfigError(f"HarMAConfig.{name}={width} must be a positive multiple of its heads ({heads})")

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
            raise ConfigError(f"unknown HarMAConfig fields {unknown}; this file was written by a newer harma_fast?")
        return cls(**data)

    def describe_difference(self, other: "HarMAConfig") -> str:
        """Human-readable list of the fields where two configs differ."""
        diffs = [f"{f.name}: {getattr(self, f.name)!r} vs {getattr(other, f.name)!r}"
                 for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]
        return "; ".join(diffs)


# --------------------------------------------------------------------------------------------
# settings checks (TrainConfig and the CLI share them)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rule:
    """A range or set a setting must lie in; ``text`` completes "must be ..."."""

    ok: Callable[[Any], bool]
    text: str


def at_least(low) -> Rule:
    return Rule(lambda v: v >= low, f">= {low}")


def above(low) -> Rule:
    return Rule(lambda v: v > low, f"> {low}")


def in_range(low, high) -> Rule:
    """``low <= v < high``."""
    return Rule(lambda v: low <= v < high, f"in [{low}, {high})")


def one_of(*choices) -> Rule:
    return Rule(lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def _type_name(hint) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:
        return " or ".join(map(_type_name, args)) + " (or null)"
    if typing.get_origin(hint) is tuple:
        return f"a list of {len(args)} numbers"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
            dict: "a mapping"}.get(typing.get_origin(hint) or hint, str(hint))


_NO = object()


def _coerce(hint, value, lenient: bool):
    """``value`` as ``hint`` (ints widen to floats, lists to tuples), or ``_NO``.

    ``lenient`` (values from YAML) also reads numbers written as strings: PyYAML follows YAML 1.1,
    which reads ``4e-4`` (no dot) as the string "4e-4".
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None) and (out := _coerce(arg, value, lenient)) is not _NO:
                return out
        return _NO
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _NO
        items = [_coerce(a, v, lenient) for a, v in zip(args, value)]
        return _NO if any(i is _NO for i in items) else tuple(items)
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if hint is float:
        if lenient and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return _NO
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        return _NO
    if hint is str:
        return value if isinstance(value, str) else _NO
    if (origin or hint) is dict:
        return value if isinstance(value, dict) else _NO
    return value  # a type we do not check


@functools.lru_cache(maxsize=None)
def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def check_setting(cls, rules: Mapping[str, Rule], name: str, value, lenient: bool = False):
    """``value`` checked (and coerced) for field ``name`` of dataclass ``cls``; raises ConfigError."""
    hints = _hints(cls)
    if name not in hints:
        known = ", ".join(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"unknown setting {name!r}; known: {known}")
    out = _coerce(hints[name], value, lenient)
    if out is _NO:
        raise ConfigError(f"{name} must be {_type_name(hints[name])}, got {value!r} ({type(value).__name__})")
    rule = rules.get(name)
    if rule is not None and out is not None and not rule.ok(out):
        raise ConfigError(f"{name} must be {rule.text}, got {out!r}")
    return out


def check_settings(obj, rules: Mapping[str, Rule]) -> None:
    """Check every field of a settings dataclass in place (lists become tuples, ints floats)."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, check_setting(type(obj), rules, f.name, getattr(obj, f.name)))


def settings_from_yaml(cls, rules: Mapping[str, Rule], data, source: str,
                       aliases: Mapping[str, Mapping[Any, Any]] = {}) -> Dict[str, Any]:  # noqa: B006 - read only
    """The settings of a YAML mapping, each checked, errors naming ``source`` and the key.

    ``aliases`` maps a field's YAML-typed values to what they mean (``fast: off`` is read by
    YAML 1.1 as the boolean false, and means "off").
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a mapping of settings (key: value), got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        for said, meant in aliases.get(key, {}).items():
            if type(said) is type(value) and said == value:  # type too: 0 == False
                value = meant
                break
        try:
            out[key] = check_setting(cls, rules, key, value, lenient=True)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
    return out
