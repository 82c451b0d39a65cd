"""Annotation files read into training and evaluation records, validated up front.

A file may be in any of the three layouts of :mod:`harma_fast.data.layouts` (HarMA,
Karpathy, NWPU-Captions), recognised from its content. A training file (or split) becomes one
record per caption, an evaluation file (or split) one record per image. Every problem — a file
that is missing or not JSON, a record without a caption or image id, an image id given to two
images (or two ids to one image) in a training file, an evaluation file with repeated images or
single-string captions (a training file given for evaluation), a missing or unreadable image (corrupt,
past PIL's decompression-bomb limit, or not 8-bit: 16-bit and float images are refused, not clipped) —
is collected, for every file of a run at once (:func:`load_splits`), and
reported in one :class:`AnnotationError` naming the file, the record and the field, before any
training starts.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

from ..errors import ConfigError, HarmaError
from ..io import ImageReadError, PathLike, open_rgb
from ..progress import bar_wanted
from .layouts import SPLITS, Entry, ParsedFile, Problem, clean_caption, read_annotations

__all__ = ["AnnotationError", "Problem", "TrainRecords", "EvalRecords", "Splits", "Survey", "clean_caption",
           "load_train_records", "load_eval_records", "load_splits", "survey"]

MAX_REPORTED = 20  # per file
ROOT_NOT_A_FOLDER = ("the image root is not a directory (--image-root: the folder the annotations' image paths are "
                     "relative to)")


class AnnotationError(HarmaError, ValueError):
    """Problems found in one or more annotation files; ``problems`` lists every one."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        self.paths = list(dict.fromkeys(p.file for p in self.problems))
        self.path = self.paths[0] if self.paths else None
        lines = []
        for path in self.paths:
            mine = [p for p in self.problems if p.file == path]
            if len(self.paths) > 1:
                lines.append(f"{path}: {len(mine)} problem(s)")
            lines += [f"  {p}" for p in mine[:MAX_REPORTED]]
            if len(mine) > MAX_REPORTED:
                lines.append(f"  ... and {len(mine) - MAX_REPORTED} more")
        # the image root is reported as a "file" of its own: it is not named an annotation file
        # ("1 problem(s) in annotation file data/images" sent users looking for a JSON file)
        roots = {p.file for p in self.problems if p.message == ROOT_NOT_A_FOLDER}
        files = len(self.paths) - len(roots)
        if len(self.paths) == 1:
            where = f"{'image root' if roots else 'annotation file'} {self.path}"
        else:
            where = " and ".join((["the image root"] if roots else [])
                                 + ([f"{files} annotation file{'s' if files > 1 else ''}"] if files else []))
        super().__init__(f"{len(self.problems)} problem(s) in {where}:\n" + "\n".join(lines))


@dataclass
class TrainRecords:
    """One entry per caption."""
    images: List[Path]
    captions: List[str]
    image_ids: List[int]   # dense 0..K-1, one per distinct image id of the dataset

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


Records = Union[TrainRecords, EvalRecords]


@dataclass
class Splits:
    train: Optional[TrainRecords] = None
    val: Optional[EvalRecords] = None
    test: Optional[EvalRecords] = None


@dataclass
class Survey:
    """What :func:`survey` found: records per request (valid entries only), every problem."""
    records: List[Optional[Records]]
    problems: List[Problem]
    files: Dict[Path, ParsedFile]
    bad_images: Dict[Path, str] = field(default_factory=dict)   # image -> why it cannot be used
    images_checked: int = 0


# --------------------------------------------------------------------------------------------
# choosing a file's records for a role
# --------------------------------------------------------------------------------------------
def _relative(image: Path, root: Path) -> Path:
    return image.relative_to(root) if image.is_relative_to(root) else image


def _usable_id(key) -> bool:
    return isinstance(key, (int, str)) and not isinstance(key, bool)


def _select(parsed: ParsedFile, role: str, split: Optional[str], root: Path) -> Tuple[List[Entry], List[Problem]]:
    """The entries of ``parsed`` a role reads, and what makes them unfit for it."""
    path, problems = parsed.path, []
    if parsed.layout is None:
        return [], []
    if parsed.layout == "harma":
        entries = parsed.entries
        wrong = [e for e in entries if e.single != (role == "train")]
        if entries and len(wrong) == len(entries):  # a whole file of the other kind: say so once
            return [], [Problem(path, None, "caption", (
                "every caption is a list: this is an evaluation file (one record per image); a training file holds "
                "one record per caption" if role == "train" else
                f"every caption is a single string and {len(entries) - len({e.image for e in entries})} records "
                "repeat an image: this is a training file (one record per caption); an evaluation file holds one "
                "record per image with the list of its captions"))]
        if role == "train":
            # the loss takes records of equal id for captions of one image: ids and images pair one to one
            by_id: Dict[Hashable, Entry] = {}
            by_image: Dict[Path, Entry] = {}
            for e in entries:
                if not e.single:
                    problems.append(Problem(path, e.record, "caption", "is a list: a training file holds one record "
                                            "per caption (is this an evaluation file?)", e.order))
                elif not _usable_id(e.key):
                    problems.append(Problem(path, e.record, "image_id", "no usable image id (an integer or string "
                                            "naming the image; captions of one image share it)", e.order))
                elif (first := by_id.setdefault(e.key, e)).image != e.image:
                    problems.append(Problem(path, e.record, "image_id", f"{e.key!r} is already the id of image "
                                            f"'{_relative(first.image, root)}' (record {first.record}; this record's "
                                            f"image is '{_relative(e.image, root)}'): each image has its own id",
                                            e.order))
                elif (first := by_image.setdefault(e.image, e)).key != e.key:
                    problems.append(Problem(path, e.record, "image_id", f"{e.key!r}, but record {first.record} gives "
                                            f"image '{_relative(e.image, root)}' the id {first.key!r}: the captions "
                                            "of one image share one id", e.order))
        else:  # Karpathy/NWPU files are checked for repeated images whatever the role (_duplicates)
            seen: Dict[Path, Entry] = {}
            for e in entries:
                if e.single:
                    problems.append(Problem(path, e.record, "caption", "is a single string: an evaluation file holds "
                                            "one record per image with the list of its captions (is this a training "
                                            "file?)", e.order))
                first = seen.setdefault(e.image, e)
                if first is not e:
                    problems.append(Problem(path, e.record, "image", f"'{e.image.name}' repeats record "
                                            f"{first.record}: an evaluation set holds each image once", e.order))
    else:
        entries = [e for e in parsed.entries if e.split == split]
        if not entries and parsed.entries:
            present = Counter(e.split for e in parsed.entries)
            problems.append(Problem(path, None, "split", f"no images with split '{split}' (the file has "
                                    + ", ".join(f"{n} {s}" for s, n in sorted(present.items())) + ")"))
    return entries, problems


def _duplicates(parsed: ParsedFile) -> List[Problem]:
    """Karpathy/NWPU files describe each image once, whatever its split."""
    if parsed.layout in (None, "harma"):
        return []
    problems, by_key, by_image = [], {}, {}
    for e in parsed.entries:
        for seen, value, name in ((by_key, e.key, "imgid"), (by_image, e.image, "filename")):
            first = seen.setdefault(value, e)
            if first is not e:
                shown = repr(value) if name == "imgid" else f"'{value.name}'"
                problems.append(Problem(parsed.path, e.record, name, f"{shown} is already used by record "
                                        f"{first.record}: each image is described once", e.order))
    return problems


def _records(role: str, entries: List[Entry]) -> Records:
    if role == "train":
        # a record without a usable id (reported) counts under its image, for data check's summary
        flat = [(e.image, c, e.key if _usable_id(e.key) else e.image) for e in entries for c in e.captions]
        dense = {k: i for i, k in enumerate(dict.fromkeys(k for _, _, k in flat))}
        return TrainRecords([i for i, _, _ in flat], [c for _, c, _ in flat], [dense[k] for _, _, k in flat])
    images, captions, text_to_image = [], [], []
    for e in entries:
        captions += e.captions
        text_to_image += [len(images)] * len(e.captions)
        images.append(e.image)
    return EvalRecords(images, captions, text_to_image)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------
def _check_image(path: Path) -> str:
    """'' if the image can be read as training and evaluation read it (8-bit RGB), else why not."""
    try:
        open_rgb(path)
    except ImageReadError as err:
        return err.why
    return ""


def _check_images(paths: Sequence[Path], workers: int = 8, progress: bool = True) -> Dict[Path, str]:
    # imported here, not at the top: the CLI's parser imports this module (`harma-fast data`), and
    # `harma-fast search` must build that parser in a serving install without tqdm (README)
    from tqdm.auto import tqdm

    with ThreadPoolExecutor(max_workers=workers) as pool:  # PIL decodes without the GIL
        verdicts = list(tqdm(pool.map(_check_image, paths), total=len(paths), desc="checking images", unit="img",
                             leave=False, disable=len(paths) < 200 or not bar_wanted(progress)))
    return {p: why for p, why in zip(paths, verdicts) if why}


# --------------------------------------------------------------------------------------------
# the loaders
# --------------------------------------------------------------------------------------------
def survey(requests: Sequence[Tuple[str, PathLike, Optional[str]]], image_root: PathLike, max_words: int = 30,
           check_images: bool = True, progress: bool = True) -> Survey:
    """Read every ``(role, file, split)`` request ("train" or "eval"; the split names the part of
    a Karpathy/NWPU file and is ignored for HarMA files) and collect every problem, without raising.

    Each file is parsed once and each image checked once, however many requests share them.
    """
    root = Path(image_root)
    files: Dict[Path, ParsedFile] = {}
    problems: List[Problem] = []
    chosen: List[Tuple[str, List[Entry]]] = []
    seen_requests = set()
    for role, path, split in requests:
        path = Path(path)
        if path not in files:
            files[path] = read_annotations(path, root, max_words)
            problems += files[path].problems + _duplicates(files[path])
        entries, unfit = _select(files[path], role, split, root)
        request = (role, path, None if files[path].layout == "harma" else split)
        if request not in seen_requests:  # the same file given twice is reported once
            problems += unfit
        seen_requests.add(request)
        chosen.append((role, entries))
    result = Survey([_records(role, e) if e else None for role, e in chosen], problems, files)
    if not root.is_dir():
        problems.insert(0, Problem(root, None, None, ROOT_NOT_A_FOLDER))
    elif check_images:
        uses: Dict[Path, Dict[Tuple[Path, object], Entry]] = {}
        for (_, path, _), (_, entries) in zip(requests, chosen):
            for e in entries:
                uses.setdefault(e.image, {})[(Path(path), e.record)] = e
        result.bad_images = _check_images(list(uses), progress=progress)
        result.images_checked = len(uses)
        for image, why in result.bad_images.items():
            problems += [Problem(path, record, "image" if files[path].layout == "harma" else "filename",
                                 f"image '{_relative(image, root)}' {why} (under {root})", e.order)
                         for (path, record), e in uses[image].items()]
    order = {p: i for i, p in enumerate(dict.fromkeys([root, *files]))}
    problems.sort(key=lambda p: (order.get(p.file, len(order)), p.order))
    return result


def _load(requests, image_root, max_words, check_images, progress=True) -> List[Optional[Records]]:
    found = survey(requests, image_root, max_words, check_images, progress)
    if found.problems:
        raise AnnotationError(found.problems)
    return found.records


def load_train_records(path: PathLike, image_root: PathLike, max_words: int = 30, check_images: bool = True,
                       split: str = "train") -> TrainRecords:
    """Read and validate a training file (HarMA, or the ``split`` of a Karpathy/NWPU file)."""
    return _load([("train", path, split)], image_root, max_words, check_images)[0]


def load_eval_records(path: PathLike, image_root: PathLike, max_words: int = 30, check_images: bool = True,
                      split: str = "test", progress: bool = True) -> EvalRecords:
    """Read and validate an evaluation file (HarMA, or the ``split`` of a Karpathy/NWPU file)."""
    return _load([("eval", path, split)], image_root, max_words, check_images, progress)[0]


def load_splits(train_file: Optional[PathLike], val_file: Optional[PathLike], test_file: Optional[PathLike],
                image_root: PathLike, max_words: int = 30, check_images: bool = True, progress: bool = True) -> Splits:
    """The records of a run; every problem of every file is reported in one AnnotationError.

    A Karpathy/NWPU file may be given for several roles: each reads the split named after it.
    """
    if not train_file:
        raise ConfigError("no training file: set train_file (--train-file, or --data for a file holding every split)")
    wanted = [(role, f, split) for role, f, split in (("train", train_file, "train"), ("eval", val_file, "val"),
                                                       ("eval", test_file, "test")) if f]
    records = iter(_load(wanted, image_root, max_words, check_images, progress))
    return Splits(*(next(records) if f else None for f in (train_file, val_file, test_file)))


def splits_in(path: PathLike) -> Optional[List[str]]:
    """The splits a Karpathy/NWPU file holds; None for a HarMA file (one split per file); all
    three for a file that cannot be read, so that its loader reports why."""
    parsed = read_annotations(path, ".")
    if parsed.layout in (None, "harma"):
        return None if parsed.layout == "harma" else list(SPLITS)
    return parsed.splits()
