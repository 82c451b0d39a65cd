"""``harma-fast data check`` and the ``--data`` flag of ``harma-fast train``.

    harma-fast data check dataset_rsicd.json --image-root RSICD_images/
    harma-fast train --data dataset_rsicd.json --image-root RSICD_images/ ...

``data check`` validates a dataset as training would and summarises it (layout, images and
captions per split, captions per image, missing or unreadable images) without building a
model; it exits 2 when the dataset has problems (bad input, as every command's refusals; 1 is
kept for a bug in harma-fast). ``--data`` names one Karpathy/NWPU file
holding every split: it fills ``--train-file/--val-file/--test-file`` (explicit flags win).
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import ConfigError
from .annotations import AnnotationError, TrainRecords, splits_in, survey
from .layouts import SPLITS

LAYOUT_NAMES = {"harma": "HarMA layout (one file per split)",
                "karpathy": "Karpathy layout (RSICD, UCM-Captions, Sydney-Captions, RSITMD)",
                "nwpu": "NWPU-Captions layout (one image folder per class)"}


def data_files(path: str, warn=lambda msg: print(msg, file=sys.stderr)) -> Dict[str, Optional[str]]:
    """``train_file``/``val_file``/``test_file`` for ``--data PATH``: the splits the file holds."""
    splits = splits_in(path)
    if splits is None:
        raise ConfigError(f"--data {path}: this file is in the HarMA layout, one split per file; pass it as "
                          "--train-file (and the others as --val-file/--test-file), or give --data a Karpathy "
                          "or NWPU-Captions file holding every split")
    files = {f"{split}_file": path if split in splits or split == "train" else None for split in SPLITS}
    if "val" not in splits:
        warn(f"note: {path} has no 'val' split: training without validation; the test split (if any) is "
             "evaluated with the final adapters. Pass --val-file to validate.")
    return files


def add_data_parser(sub) -> None:
    from ..cliargs import add_subparser, positive_int

    p = add_subparser(sub, "data", "inspect datasets (validate and summarise annotation files)",
                      "Inspect datasets without training: `harma-fast data check FILE --image-root DIR`.")
    # metavar: without it a bare `harma-fast data` said "required: data_command", the internal dest name
    commands = p.add_subparsers(dest="data_command", required=True, metavar="command")
    c = add_subparser(commands, "check", "validate and summarise an annotation file",
                      "Validate an annotation file as training would (every record, every image) "
                      "and summarise it: layout, images and captions per split, captions per image, missing "
                      "files. Exits 2 if the dataset has problems (0 if none).")
    c.add_argument("file", help="annotation file: HarMA, Karpathy (dataset_rsicd.json, ...) or NWPU layout")
    c.add_argument("--image-root", required=True, help="folder the file's image paths are relative to")
    c.add_argument("--max-words", type=positive_int, default=30, help="captions are cut to this many words")
    c.add_argument("--no-check-images", dest="check_images", action="store_false",
                   help="do not open every image (faster; missing files are then not reported)")
    c.set_defaults(handler=run_data_check)


def _stats(records) -> List[str]:
    if isinstance(records, TrainRecords):
        per_image, images = Counter(records.image_ids), len(set(records.image_ids))
    else:
        per_image, images = Counter(records.text_to_image), len(records.images)
    counts = list(per_image.values())
    return [str(images), str(len(records.captions)), f"{len(records.captions) / max(1, images):.2f}",
            f"{min(counts, default=0)}-{max(counts, default=0)}"]


def check_report(path: str, image_root: str, max_words: int = 30, check_images: bool = True):
    """``(report text, problems)`` for one annotation file."""
    splits = splits_in(path)
    if splits is None:  # a HarMA file is one split; its captions say which kind
        from .layouts import read_annotations

        entries = read_annotations(path, image_root, max_words).entries
        role = "train" if sum(e.single for e in entries) * 2 > len(entries) else "eval"
        requests = [(role, path, None)]
        names = ["training file" if role == "train" else "evaluation file"]
    else:
        splits = splits or ["train"]  # no usable record: the file is read all the same, to report why
        requests = [("train" if s == "train" else "eval", path, s) for s in splits]
        names = list(splits)
    parsed = survey(requests, image_root, max_words, check_images)
    layout = parsed.files[Path(path)].layout
    lines = [f"{path}: {LAYOUT_NAMES.get(layout, 'unreadable')}; images under {image_root}"]
    rows = [["split", "images", "captions", "captions/image", "min-max"]]
    rows += [[name, *_stats(rec)] for name, rec in zip(names, parsed.records) if rec is not None]
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
                  for r in rows]
    if layout is None:
        pass  # nothing to count: the problems below say why
    elif check_images:
        missing = sorted(p for p, why in parsed.bad_images.items() if why == "not found")
        unreadable = len(parsed.bad_images) - len(missing)
        lines.append(f"images checked: {parsed.images_checked}; missing: {len(missing)}; unreadable: {unreadable}")
        lines += [f"  missing: {p}" for p in missing[:10]] + ([f"  ... and {len(missing) - 10} more"]
                                                            if len(missing) > 10 else [])
    else:
        lines.append("images not checked (--no-check-images)")
    return "\n".join(lines), parsed.problems


def run_data_check(args: argparse.Namespace) -> int:
    text, problems = check_report(args.file, args.image_root, args.max_words, args.check_images)
    print(text)
    if problems:
        print(str(AnnotationError(problems)))
        return 2  # bad input, as every refusal: exit 1 means a bug in harma-fast (cli.main)
    print("no problems found")
    return 0
