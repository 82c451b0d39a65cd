"""Annotation files in the RSITMD/RSICD layout (DESIGN §2), read and validated up front.

Training files hold one record per caption, ``{"image", "caption", "image_id", ...}``;
evaluation files one record per image, ``{"image", "caption": [captions]}``; image paths are
relative to an image root. Every problem — malformed JSON, a record without a caption, a
missing or unreadable image — is collected and reported in one error naming the file, the
record index and the image path, before any training starts.
"""
from __future__ import annotations

import json
import re
import string
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

from tqdm.auto import tqdm

from ..io import PathLike

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
MAX_REPORTED = 20


class AnnotationError(ValueError):
    """Problems found in an annotation file; ``problems`` lists (record index or None, message)."""

    def __init__(self, path: PathLike, problems: Sequence[Tuple[object, str]]):
        self.path, self.problems = Path(path), list(problems)
        lines = [f"  record {i}: {msg}" if i is not None else f"  {msg}" for i, msg in self.problems[:MAX_REPORTED]]
        more = len(self.problems) - MAX_REPORTED
        if more > 0:
            lines.append(f"  ... and {more} more")
        super().__init__(f"{len(self.problems)} problem(s) in annotation file {self.path}:\n" + "\n".join(lines))


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, strip punctuation, collapse spaces, keep at most ``max_words`` words."""
    words = _PUNCT.sub(" ", text.lower()).split()
    return " ".join(words[:max_words])


@dataclass
class TrainRecords:
    """One entry per caption."""
    images: List[Path]
    captions: List[str]
    image_ids: List[int]   # dense 0..K-1, one per distinct ``image_id`` of the file

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class EvalRecords:
    """One entry per image; captions flattened, each pointing at its image."""
    images: List[Path]
    captions: List[str]
    text_to_image: List[int]

    def __len__(self) -> int:
        return len(self.images)


def _read_json(path: PathLike) -> list:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise AnnotationError(path, [(None, f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}")]) from err
    except UnicodeDecodeError as err:
        raise AnnotationError(path, [(None, f"not UTF-8 text ({err.reason})")]) from err
    if not isinstance(data, list):
        raise AnnotationError(path, [(None, f"expected a JSON list of records, found a {type(data).__name__}")])
    if not data:
        raise AnnotationError(path, [(None, "the file holds no records (empty dataset)")])
    return data


def _check_image(path: Path) -> str:
    """'' if the image decodes, else why not."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return "not found"
    try:
        with Image.open(path) as img:
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return f"cannot be decoded ({err})"
    return ""


def _check_images(paths: Dict[Path, List[int]], root: Path, desc: str, workers: int = 8) -> List[Tuple[int, str]]:
    ordered = list(paths)
    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        verdicts = list(tqdm(pool.map(_check_image, ordered), total=len(ordered), desc=desc, unit="img",
                             leave=False, disable=len(ordered) < 200))
    problems = []
    for path, why in zip(ordered, verdicts):
        if why:
            rel = path.relative_to(root) if path.is_relative_to(root) else path
            problems.extend((i, f"image '{rel}' {why} (under {root})") for i in paths[path])
    return problems


def _image_path(record: dict, root: Path, problems: list, index: int):
    name = record.get("image")
    if not isinstance(name, str) or not name:
        problems.append((index, "no 'image' path"))
        return None
    return root / name


def _load(path: PathLike, image_root: PathLike, check_images: bool, parse: Callable) -> List[Tuple[Path, object]]:
    """Validate every record of a file; ``parse(record, index, problems)`` reads the captions.

    Returns ``(image path, parsed)`` per valid record, or raises one AnnotationError listing
    every problem of the file (and every image that is missing or does not decode).
    """
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    problems: list = []
    uses: Dict[Path, List[int]] = {}
    parsed = []
    for i, rec in enumerate(_read_json(path)):
        if not isinstance(rec, dict):
            problems.append((i, f"expected an object, found a {type(rec).__name__}"))
            continue
        image = _image_path(rec, root, problems, i)
        value = parse(rec, i, problems)
        if image is None or value is None:
            continue
        uses.setdefault(image, []).append(i)
        parsed.append((image, value))
    if check_images:
        problems.extend(_check_images(uses, root, f"checking {Path(path).name}"))
    if problems:
        raise AnnotationError(path, sorted(problems, key=lambda p: (p[0] is None, p[0] or 0)))
    return parsed


def load_train_records(path: PathLike, image_root: PathLike, max_words: int = 30,
                       check_images: bool = True) -> TrainRecords:
    """Read and validate a training file (one record per caption)."""
    def parse(rec, i, problems):
        caption = rec.get("caption")
        caption = clean_caption(caption, max_words) if isinstance(caption, str) else ""
        if not caption:
            problems.append((i, "record without caption (missing, not a string, or empty after clean-up)"))
        image_id = rec.get("image_id")
        if image_id is None or isinstance(image_id, (bool, float, list, dict)):
            problems.append((i, "no usable 'image_id' (an integer or string naming the image)"))
            return None
        return (caption, image_id) if caption else None

    parsed = _load(path, image_root, check_images, parse)
    dense = {v: k for k, v in enumerate(dict.fromkeys(raw for _, (_, raw) in parsed))}
    return TrainRecords([img for img, _ in parsed], [cap for _, (cap, _) in parsed],
                        [dense[raw] for _, (_, raw) in parsed])


def load_eval_records(path: PathLike, image_root: PathLike, max_words: int = 30,
                      check_images: bool = True) -> EvalRecords:
    """Read and validate an evaluation file (one record per image with its captions)."""
    def parse(rec, i, problems):
        caps = rec.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        cleaned = [clean_caption(c, max_words) for c in caps if isinstance(c, str)] if isinstance(caps, list) else []
        if not cleaned or not all(cleaned) or len(cleaned) != len(caps):
            problems.append((i, "record without caption: 'caption' must be a non-empty list of non-empty strings"))
            return None
        return cleaned

    images, captions, text_to_image = [], [], []
    for image, cleaned in _load(path, image_root, check_images, parse):
        captions.extend(cleaned)
        text_to_image.extend([len(images)] * len(cleaned))
        images.append(image)
    return EvalRecords(images, captions, text_to_image)
