"""When a progress bar is drawn: one rule for every bar of the library and the CLI."""
from __future__ import annotations

import os
import sys


def bar_wanted(progress: bool = True) -> bool:
    """A bar only where someone watches: asked for (``--no-progress`` turns it off), not disabled by
    ``TQDM_DISABLE`` (tqdm reads that only for arguments left unset, and we always set ``disable=``),
    and stderr a terminal — a log file, a pipe or CI gets plain lines, not redrawn bars."""
    disabled = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no", "off")
    return progress and not disabled and sys.stderr.isatty()
