"""The three layouts remote-sensing caption datasets ship in, read into one form.

* **HarMA** (the HarMA repository's converted files, one file per split): a JSON list;
  training files hold one record per caption ``{"image", "caption": str, "image_id"}``,
  evaluation files one record per image ``{"image", "caption": [str, ...]}``.
* **Karpathy** (RSICD ``dataset_rsicd.json``, UCM-Captions, Sydney-Captions, RSITMD
  ``dataset_RSITMD.json``): ``{"images": [{"filename", "imgid", "split", "sentences":
  [{"raw", "tokens", ...}], ...}]}``, all splits in one file; ``"restval"`` counts as train.
* **NWPU-Captions** (``dataset_nwpu.json``): ``{class name: [{"filename", "split", "raw",
  "raw_1", ..., "raw_4", ...}]}``, images under ``<image root>/<class name>/<filename>``.

Every file becomes a list of :class:`Entry` (an image, its captions, the dataset's own image
id, its split) plus the problems found, each naming the file, the record and the field. Nothing
here raises on malformed input: :mod:`harma_fast.data.annotations` gathers the problems of every
file and reports them at once.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, List, NamedTuple, Optional, Union

from ..io import PathLike

_PUNCT = str.maketrans(string.punctuation, " " * len(string.punctuation))
_RAW_KEY = re.compile(r"raw(?:_(\d+))?")
SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"restval": "train"}  # Karpathy's extra training images
LAYOUTS = ("harma", "karpathy", "nwpu")


class Problem(NamedTuple):
    """One thing wrong with an annotation file; ``record``/``field`` are None for the whole file."""
    file: Path
    record: Union[int, str, None]   # index (HarMA) or locator such as ``images[3]``, ``airport[7]``
    field: Optional[str]
    message: str
    order: int = -1                 # position of the record in the file, for sorting

    def __str__(self) -> str:
        where = "" if self.record is None else f"record {self.record}"
        if self.field:
            where += f"{', ' if where else ''}field '{self.field}'"
        return f"{where}: {self.message}" if where else self.message


def clean_caption(text: str, max_words: int = 30) -> str:
    """Lower-case, strip punctuation, collapse spaces, keep at most ``max_words`` words."""
    words = text.lower().translate(_PUNCT).split()
    return " ".join(words[:max_words])


@dataclass
class Entry:
    """One record of a file: an image with its captions (one caption for HarMA training records)."""
    record: Union[int, str]
    order: int
    image: Optional[Path]
    captions: List[str]
    key: Optional[Hashable] = None       # the dataset's own image id (``image_id``, ``imgid``)
    split: Optional[str] = None          # None in the HarMA layout: the file is the split
    single: bool = False                 # HarMA: ``caption`` was one string (a training record)


@dataclass
class ParsedFile:
    path: Path
    layout: Optional[str]                # None when the file could not be read at all
    entries: List[Entry] = field(default_factory=list)
    problems: List[Problem] = field(default_factory=list)

    def splits(self) -> List[str]:
        present = {e.split for e in self.entries}
        return [s for s in SPLITS if s in present]


# --------------------------------------------------------------------------------------------
# reading and recognising a file
# --------------------------------------------------------------------------------------------
def detect_layout(data) -> Optional[str]:
    if isinstance(data, list):
        return "harma"
    if isinstance(data, dict) and "images" in data:
        return "karpathy"
    if isinstance(data, dict) and any(isinstance(v, list) for v in data.values()):
        return "nwpu"
    return None


def read_annotations(path: PathLike, image_root: PathLike, max_words: int = 30) -> ParsedFile:
    """Parse one annotation file of any layout; image files are not opened here."""
    path, root = Path(path), Path(image_root)
    out = ParsedFile(path, None)

    def whole(message: str) -> ParsedFile:
        out.problems.append(Problem(path, None, None, message))
        return out

    if not path.is_file():
        return whole("the annotation file does not exist" + (" (it is a directory)" if path.is_dir() else ""))
    try:
        # utf-8-sig: a byte-order mark (Windows Notepad writes one) is not part of the JSON
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        return whole(f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}")
    except UnicodeDecodeError as err:
        return whole(f"not UTF-8 text ({err.reason})")
    out.layout = detect_layout(data)
    if out.layout is None:
        return whole(f"expected a JSON list of records (HarMA layout), {{\"images\": [...]}} (Karpathy layout: "
                     f"RSICD, UCM, Sydney, RSITMD) or {{class name: [...]}} (NWPU-Captions); found a "
                     f"{type(data).__name__}" + (f" with keys {sorted(data)[:5]}" if isinstance(data, dict) else ""))
    {"harma": _parse_harma, "karpathy": _parse_karpathy, "nwpu": _parse_nwpu}[out.layout](data, root, max_words, out)
    if not out.entries and not out.problems:
        whole("the file holds no records (empty dataset)")
    return out


def _image_name(rec: dict, key: str, out: ParsedFile, locator, order: int) -> Optional[str]:
    name = rec.get(key)
    if not isinstance(name, str) or not name.strip():
        out.problems.append(Problem(out.path, locator, key, "missing or not a file name", order))
        return None
    return name


def _image_id(rec: dict, key: str, out: ParsedFile, locator, order: int, required: bool):
    value = rec.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        out.problems.append(Problem(out.path, locator, key, f"{value!r} is not an image id (an integer or string)",
                                    order))
        return None
    return value


def _split(rec: dict, out: ParsedFile, locator, order: int) -> Optional[str]:
    value = rec.get("split")
    if isinstance(value, str):  # a list or object is not a split (and cannot be looked up)
        value = SPLIT_ALIASES.get(value, value)
    if value not in SPLITS:
        out.problems.append(Problem(out.path, locator, "split", f"{value!r} is not one of "
                                    f"{', '.join(SPLITS)} (or restval)", order))
        return None
    return value


def _caption(value, max_words: int) -> str:
    return clean_caption(value, max_words) if isinstance(value, str) else ""


# --------------------------------------------------------------------------------------------
# the three layouts
# --------------------------------------------------------------------------------------------
def _parse_harma(data: list, root: Path, max_words: int, out: ParsedFile) -> None:
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            out.problems.append(Problem(out.path, i, None, f"expected an object, found a {type(rec).__name__}", i))
            continue
        name = _image_name(rec, "image", out, i, i)
        caption, single = rec.get("caption"), isinstance(rec.get("caption"), str)
        captions = [_caption(c, max_words) for c in ([caption] if single else caption or [])] \
            if isinstance(caption, (str, list)) else []
        if not captions or not all(captions):
            found = (f"the caption is {caption!r}" if not isinstance(caption, (str, list, type(None)))
                     else "no caption" if not caption else "no caption text")
            out.problems.append(Problem(out.path, i, "caption", f"{found}: expected a string (training record) or "
                                        "a non-empty list of strings (evaluation record), each non-empty after "
                                        "clean-up", i))
            continue
        # the image id is only needed of training records; annotations.py asks for it there
        key = rec.get("image_id")
        if name is not None:
            out.entries.append(Entry(i, i, root / name, captions, key, None, single))


def _parse_karpathy(data: dict, root: Path, max_words: int, out: ParsedFile) -> None:
    images = data["images"]
    if not isinstance(images, list):
        out.problems.append(Problem(out.path, None, "images", f"expected a list of images, found a "
                                    f"{type(images).__name__}"))
        return
    for i, rec in enumerate(images):
        loc = f"images[{i}]"
        if not isinstance(rec, dict):
            out.problems.append(Problem(out.path, loc, None, f"expected an object, found a {type(rec).__name__}", i))
            continue
        name = _image_name(rec, "filename", out, loc, i)
        folder = rec.get("filepath")  # COCO-style files put images in sub-folders
        key = _image_id(rec, "imgid", out, loc, i, required=False)
        split = _split(rec, out, loc, i)
        sentences = rec.get("sentences")
        if not isinstance(sentences, list) or not sentences:
            out.problems.append(Problem(out.path, loc, "sentences", "missing or not a non-empty list of sentences", i))
            continue
        captions, bad = [], []
        for j, s in enumerate(sentences):
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and isinstance(s.get("tokens"), list):
                raw = " ".join(t for t in s["tokens"] if isinstance(t, str))
            text = _caption(raw, max_words)
            (captions.append(text) if text else bad.append(j))
        for j in bad:
            out.problems.append(Problem(out.path, loc, f"sentences[{j}].raw", "no caption text (missing, not a "
                                        "string, or empty after clean-up)", i))
        if name is None or split is None or bad:
            continue
        relative = f"{folder}/{name}" if isinstance(folder, str) and folder else name
        # without an imgid the image is its path: two sub-folders may hold files of the same name
        out.entries.append(Entry(loc, i, root / relative, captions, relative if key is None else key, split))


def _parse_nwpu(data: dict, root: Path, max_words: int, out: ParsedFile) -> None:
    order = 0
    for label, records in data.items():
        if not isinstance(records, list):
            out.problems.append(Problem(out.path, label, None, f"expected the list of the class's images, found a "
                                        f"{type(records).__name__}", order))
            continue
        for j, rec in enumerate(records):
            loc, order = f"{label}[{j}]", order + 1
            if not isinstance(rec, dict):
                out.problems.append(Problem(out.path, loc, None, f"expected an object, found a {type(rec).__name__}",
                                            order))
                continue
            name = _image_name(rec, "filename", out, loc, order)
            key = _image_id(rec, "imgid", out, loc, order, required=False)
            split = _split(rec, out, loc, order)
            raws = sorted((int(m.group(1) or 0), k) for k in rec if (m := _RAW_KEY.fullmatch(k)))
            if not raws or raws[0][0] != 0:
                out.problems.append(Problem(out.path, loc, "raw", "missing: NWPU records hold their captions in "
                                            "'raw', 'raw_1', ... 'raw_4'", order))
                continue
            captions = [_caption(rec[k], max_words) for _, k in raws]
            bad = [k for (_, k), c in zip(raws, captions) if not c]
            for k in bad:
                out.problems.append(Problem(out.path, loc, k, "no caption text (not a string, or empty after "
                                            "clean-up)", order))
            if name is None or split is None or bad:
                continue
            out.entries.append(Entry(loc, order, root / label / name, captions,
                                     f"{label}/{name}" if key is None else key, split))
