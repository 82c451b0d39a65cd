"""What the ``harma-fast`` parsers share: checked argument types, a help formatter, path checks.

Kept free of torch so ``harma-fast --help`` and ``harma-fast search`` (ONNX Runtime only) stay
light. Every numeric flag is checked when it is parsed: argparse then prints
``harma-fast <cmd>: error: argument --flag: must be >= 1, got 0`` and exits with status 2,
before any data is read or any file written.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

from .config import Rule, above, at_least

BACKENDS = ("auto", "triton", "reference")  # harma_fast.backend.BACKENDS (that module imports torch)
PRECISIONS = ("auto", "bf16", "fp32")
HARMA_LAYOUTS = ("paper", "released", "none")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: ...)`` after every option that has a real default (not None/False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        if isinstance(action, argparse._StoreFalseAction):  # a --no-X switch: "(default: True)" reads as on
            return text
        return super()._get_help_string(action)


def _checked(kind: type, rule: Rule) -> Callable[[str], object]:
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {noun} {rule.text}, got {text!r}") from None
        if (kind is float and not math.isfinite(value)) or not rule.ok(value):
            raise argparse.ArgumentTypeError(f"must be {noun} {rule.text}, got {text}")
        return value

    parse.__name__ = f"{noun} {rule.text}"  # argparse names the type in some messages
    return parse


positive_int = _checked(int, at_least(1))
non_negative_int = _checked(int, at_least(0))
positive_float = _checked(float, above(0))


def add_subparser(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:  # noqa: A002
    """A sub-command whose ``--help`` has a description and shows the defaults."""
    return sub.add_parser(name, help=help, description=description, formatter_class=HelpFormatter)
