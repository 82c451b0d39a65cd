"""Small file helpers shared by checkpoints, training runs, exports and the CLI, and the one image
reader (:func:`open_rgb`: a file as 8-bit RGB, or an :class:`ImageReadError` saying why not)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Union

from .errors import HarmaError, InputPathError, OutputPathError

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


# How torch.save's C++ zip writer and safetensors' Rust writer report a write that failed (a full disk,
# a quota, a file-size limit): a RuntimeError or SafetensorError, not the OSError Python's own writes raise
_WRITE_FAILURES = ("inline_container.cc", "PytorchStreamWriter", "file write failed", "iostream error",
                   "I/O error")


@contextlib.contextmanager
def failed_writes_named(path: PathLike) -> Iterator[None]:
    """Around a library writer (torch.save, safetensors): a failed write becomes an
    :class:`OutputPathError` naming the file and the space left on its disk, which the CLI reports
    in one line, instead of a RuntimeError it takes for a bug in harma-fast. Use it inside
    :func:`atomic_path`, which then keeps the file that was there before."""
    try:
        yield
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - only write failures are translated; the rest re-raised
        text = str(err).strip()
        if not any(marker in text for marker in _WRITE_FAILURES):
            raise
        import shutil

        path = Path(path)
        try:
            free = f"{shutil.disk_usage(path.parent if str(path.parent) else '.').free / 2**20:,.0f} MiB free"
        except OSError:
            free = "free space unknown"
        reason = text.splitlines()[0][:200]
        raise OutputPathError(f"cannot write {path}: the write failed ({reason}; {free} on its disk): is the disk "
                              "full or over a quota? The file there before, if any, is kept; free some space "
                              "and run the command again (a training run goes on with --resume)") from err


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


def refuse_foreign_file(path: PathLike, what: str, ours: Callable[[Path], bool], kind: str) -> None:
    """An existing, non-empty file at ``path`` that ``ours`` does not recognise (``kind``: what we
    write there) is never overwritten: `eval --output data/test.json` replaced the test split's
    annotations with metrics, `search --html` an image or a dataset file with a page."""
    path = Path(path)
    if path.is_file() and path.stat().st_size and not ours(path):
        raise OutputPathError(f"{what} {path} exists and is not {kind} (it would be overwritten); give another "
                              "file name, or move that file away")


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


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
class ImageReadError(HarmaError, ValueError):
    """An image that cannot be used as 8-bit RGB. ``why`` is the reason alone ("is a 16-bit ...",
    "not found"), for reports that name the image their own way (``data check``'s records)."""

    def __init__(self, message: str, why: str = ""):
        # torch's DataLoader re-raises a worker's exception as ``type(err)(its formatted traceback)``:
        # keep our one-line message (the traceback's last line), not the traceback
        if message.startswith("Caught ") and "\nOriginal Traceback" in message:
            where = message.split("\n", 1)[0].split(" in ", 1)[-1].rstrip(".")
            message = f"{message.rstrip().rsplit(f'{type(self).__name__}: ', 1)[-1]} (read in {where})"
        super().__init__(message)
        self.why = why or message


def _mode_problem(mode: str) -> str:
    """'' if PIL's ``convert("RGB")`` keeps the pixels of an image of this mode, else why not.

    The 8-bit modes (1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, ...) convert faithfully; the modes of
    wider samples (I;16*, I, F) are clipped to 0..255 instead of scaled: 12-bit sensor data comes
    out nearly white, reflectance in 0..1 black. Which scaling is right depends on the sensor, so
    such images are refused, never guessed at.
    """
    if mode in ("I", "F") or mode.startswith("I;"):
        kind = {"I": "32-bit integer", "F": "32-bit floating-point"}.get(mode, "16-bit")
        return (f"is a {kind} single-band image (PIL mode {mode}); harma_fast reads 8-bit images: convert it "
                "to 8-bit RGB first, with the scaling your sensor needs")
    return ""


def _too_large(err: Exception) -> str:
    """Why an image that PIL refused as a decompression bomb cannot be read, with its size."""
    import re

    from PIL import Image

    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    size = tb.tb_frame.f_locals.get("size") if tb is not None else None  # PIL's check gets (width, height)
    if isinstance(size, tuple) and len(size) == 2 and all(isinstance(n, int) for n in size):
        shown = f"is {size[0]}x{size[1]} px"
    else:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        shown = f"has {int(pixels.group(1)):,} pixels" if pixels else "is too large to decode safely"
    limit = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    return (f"{shown}, past PIL's decompression-bomb limit" + (f" of {limit:,} pixels" if limit else "")
            + " (twice PIL.Image.MAX_IMAGE_PIXELS), too large to decode safely: cut the scene into tiles or "
            "downscale it, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust the file")


def _converted(image, name: str):
    try:
        return image.convert("RGB")
    except ValueError as err:  # a mode PIL cannot convert (La, ...)
        why = f"cannot be converted to RGB ({err})"
        raise ImageReadError(f"{name} {why}", why) from err


def to_rgb(image, name: str = "the PIL image given"):
    """An open PIL image as 8-bit RGB, or an :class:`ImageReadError` (a ValueError) saying why not."""
    why = _mode_problem(image.mode)
    if why:
        raise ImageReadError(f"{name} {why}", why)
    return _converted(image, name)


def open_rgb(path: PathLike):
    """The image file at ``path`` decoded as 8-bit RGB, or an :class:`ImageReadError` saying why not:
    missing, not decodable, past PIL's decompression-bomb limit, or not 8-bit (see ``_mode_problem``).

    The one place harma_fast opens images: training, evaluation, ``data check`` and serving.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"image {path} not found", "not found")
    try:
        with Image.open(path) as img:
            why = _mode_problem(img.mode)  # known from the header: refused before decoding
            if not why:
                img.load()
                return _converted(img, f"image {path}")
    except ImageReadError:
        raise
    except Image.DecompressionBombError as err:  # not an OSError
        why = _too_large(err)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        why = f"cannot be read: it cannot be decoded as an image ({err})"
    raise ImageReadError(f"image {path} {why}", why)
