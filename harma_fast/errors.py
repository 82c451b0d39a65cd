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
