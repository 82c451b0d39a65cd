"""The project's expected failures.

Everything a user can cause — a bad flag, a missing or corrupt file, a malformed record, a
checkpoint of another model — raises a :class:`HarmaError` whose message names the culprit
(file, flag, field, value) and says what to do. The CLI prints such messages without a
traceback; anything else is a bug and is reported as one.
"""
from __future__ import annotations


class HarmaError(Exception):
    """An expected failure caused by input; its message is meant for the user."""


class ConfigError(HarmaError, ValueError):
    """A setting (flag, preset field, argument) is missing, of the wrong type or out of range."""


class InputPathError(HarmaError, FileNotFoundError):
    """An input file or folder named by the user does not exist or is of the wrong kind."""


class UnsupportedModelError(HarmaError, TypeError):
    """A model harma_fast cannot patch (not an open_clip ViT CLIP, or an unknown block layout)."""


class CheckpointError(HarmaError, ValueError):
    """A checkpoint or adapter file is unreadable, corrupt, or belongs to another model."""


class OutputPathError(HarmaError, ValueError):
    """An output path cannot be written (its parent is a file, it is a folder, no permission)."""


class MissingDependencyError(HarmaError, ImportError):
    """An optional package a command or class needs is not installed (the message says how to install it)."""


# optional packages -> the extra of harma-fast that installs them
OPTIONAL_PACKAGES = {"onnx": "onnx", "onnxruntime": "onnx", "onnxscript": "onnx",
                     "transformers": "hf", "tokenizers": "hf"}


# harma-fast's own dependencies (module -> package): a serving install (README: onnxruntime, numpy,
# pillow, regex, ftfy) lacks them, and only OrtEncoder and `search` run without them
CORE_PACKAGES = {"torch": "torch", "torchvision": "torchvision", "open_clip": "open_clip_torch", "triton": "triton",
                 "safetensors": "safetensors", "tqdm": "tqdm", "yaml": "pyyaml", "matplotlib": "matplotlib"}


def missing_dependency_message(names, what: str) -> str:
    """``what`` needs the modules ``names`` (optional or core): which, and the pip command that installs them."""
    extras = sorted({OPTIONAL_PACKAGES[n] for n in names if n in OPTIONAL_PACKAGES})
    packages = " ".join(CORE_PACKAGES.get(n, n) for n in names)  # a module's package: open_clip -> open_clip_torch
    install = f"pip install 'harma-fast[{','.join(extras)}]'" if extras else f"pip install {packages}"
    if list(names) == ["onnxruntime"]:
        install += " (or just: pip install onnxruntime; onnxruntime-gpu for the CUDA provider)"
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    return f"{what} needs {listed}, which {'is' if len(names) == 1 else 'are'} not installed: {install}"


def require_modules(names, what: str) -> None:
    """Raise :class:`MissingDependencyError` unless every module in ``names`` can be imported (not imported here)."""
    import importlib.util

    missing = [n for n in names if importlib.util.find_spec(n) is None]
    if missing:
        raise MissingDependencyError(missing_dependency_message(missing, what))
