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
from typing import Dict, List, Sequence, Tuple

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


def load_train_records(path: PathLike, image_root: PathLike, max_words: int = 30,
                       check_images: bool = True) -> TrainRecords:
    """Read and validate a training file (one record per caption)."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    data = _read_json(path)
    problems: list = []
    images, captions, raw_ids = [], [], []
    uses: Dict[Path, List[int]] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            problems.append((i, f"expected an object, found a {type(rec).__name__}"))
            continue
        image = _image_path(rec, root, problems, i)
        caption = rec.get("caption")
        if not isinstance(caption, str) or not clean_caption(caption, max_words):
            problems.append((i, "record without caption (missing, not a string, or empty after clean-up)"))
            caption = None
        image_id = rec.get("image_id")
        if image_id is None or isinstance(image_id, (bool, float, list, dict)):
            problems.append((i, "no usable 'image_id' (an integer or string naming the image)"))
        if image is None or caption is None or image_id is None:
            continue
        uses.setdefault(image, []).append(i)
        images.append(image)
        captions.append(clean_caption(caption, max_words))
        raw_ids.append(image_id)
    if check_images:
        problems.extend(_check_images(uses, root, f"checking {Path(path).name}"))
    if problems:
        raise AnnotationError(path, sorted(problems, key=lambda p: (p[0] is None, p[0] or 0)))
    dense = {v: k for k, v in enumerate(dict.fromkeys(raw_ids))}
    return TrainRecords(images, captions, [dense[v] for v in raw_ids])


def load_eval_records(path: PathLike, image_root: PathLike, max_words: int = 30,
                      check_images: bool = True) -> EvalRecords:
    """Read and validate an evaluation file (one record per image with its captions)."""
    root = Path(image_root)
    if not root.is_dir():
        raise FileNotFoundError(f"image root {root} is not a directory")
    data = _read_json(path)
    problems: list = []
    images, captions, text_to_image = [], [], []
    uses: Dict[Path, List[int]] = {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            problems.append((i, f"expected an object, found a {type(rec).__name__}"))
            continue
        image = _image_path(rec, root, problems, i)
        caps = rec.get("caption")
        caps = [caps] if isinstance(caps, str) else caps
        cleaned = [clean_caption(c, max_words) for c in caps if isinstance(c, str)] if isinstance(caps, list) else []
        if not cleaned or not all(cleaned) or len(cleaned) != len(caps):
            problems.append((i, "record without caption: 'caption' must be a non-empty list of non-empty strings"))
            continue
        if image is None:
            continue
        uses.setdefault(image, []).append(i)
        for c in cleaned:
            captions.append(c)
            text_to_image.append(len(images))
        images.append(image)
    if check_images:
        problems.extend(_check_images(uses, root, f"checking {Path(path).name}"))
    if problems:
        raise AnnotationError(path, sorted(problems, key=lambda p: (p[0] is None, p[0] or 0)))
    return EvalRecords(images, captions, text_to_image)
