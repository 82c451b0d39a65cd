"""Small file helpers shared by checkpoints, training runs, exports and the CLI."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import InputPathError, OutputPathError

PathLike = Union[str, os.PathLike]

# mkstemp creates 0600 files; finished files get the mode a plain open() would give them
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    A crash or an exception while writing leaves the previous file untouched (and no partial
    file behind), so a checkpoint is either the old one or the complete new one.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a directory; give a file name")
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.exists():
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OSError(f"cannot create directory {directory} for {path.name}: {err.strerror or err}") from err
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot write {path}: directory {directory} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def require_file(path: PathLike, what: str) -> Path:
    """``Path(path)`` if it is an existing file, else an :class:`InputPathError` saying what it was for."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise InputPathError(f"{what} {path} {state}")
    return path


def require_dir(path: PathLike, what: str) -> Path:
    """``Path(path)`` if it is an existing folder, else an :class:`InputPathError` saying what it was for."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise InputPathError(f"{what} {path} {state}")
    return path


def _blocking_file(path: Path) -> Path | None:
    """The nearest existing ancestor of ``path`` if it is not a folder (so nothing can go below it)."""
    for parent in path.parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_output_file(path: PathLike, what: str) -> Path:
    """Check, before any work, that a file can be written at ``path`` (existing files get replaced).

    Refuses a path that is a folder or lies below a regular file, and a folder we may not write;
    creates nothing, so a command that fails later leaves the disk as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a directory; give a file name, e.g. {path / 'out'}")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise OutputPathError(f"{what} {path} cannot be written: {blocker} is a file, not a folder")
    _check_writable_ancestor(path, what)
    return path


def check_output_dir(path: PathLike, what: str) -> Path:
    """Check, before any work, that ``path`` is or can become a folder we may write into."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"{what} {path} is a file; give a folder")
    blocker = _blocking_file(path)
    if blocker is not None:
        raise OutputPathError(f"{what} {path} cannot be created: {blocker} is a file, not a folder")
    _check_writable_ancestor(path / "_", what)
    return path


def _check_writable_ancestor(path: Path, what: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputPathError(f"{what} {path} cannot be written: folder {parent} is not writable")
            return
