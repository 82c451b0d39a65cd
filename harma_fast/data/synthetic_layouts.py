"""The synthetic dataset (:mod:`harma_fast.data.synthetic`) rewritten in the layouts the real
datasets ship in, so the readers are tested on files shaped like the real ones.

``generate()`` writes the HarMA layout (train/val/test JSON); these writers convert those
records, keeping image order and captions, so that every layout reads into the same records:

* :func:`write_karpathy` — one ``dataset_synthetic.json`` like ``dataset_rsicd.json``: captions
  as ``sentences`` with ``raw`` text (capitalised, with a final " ." as RSICD's are) and
  ``tokens``; image ids ``imgid`` numbered over the whole file.
* :func:`write_nwpu` — one ``dataset_nwpu.json`` keyed by class (the records' ``label_name``),
  captions in ``raw``, ``raw_1``, ...; images linked (or copied) into one folder per class.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from ..io import PathLike, atomic_path

SPLITS = ("train", "val", "test")


def _images(paths: Dict[str, Path]) -> Iterator[Tuple[str, dict, List[str]]]:
    """(split, first record, captions) per image of the HarMA-layout files, in file order."""
    for split in SPLITS:
        records = json.loads(Path(paths[split]).read_text())
        if split == "train":  # one record per caption: group them by image id, in order of appearance
            grouped: Dict[object, Tuple[dict, List[str]]] = {}
            for rec in records:
                grouped.setdefault(rec["image_id"], (rec, []))[1].append(rec["caption"])
            yield from ((split, rec, caps) for rec, caps in grouped.values())
        else:
            yield from ((split, rec, list(rec["caption"])) for rec in records)


def _raw(caption: str) -> str:
    return caption[:1].upper() + caption[1:] + " ."


def _write_json(path: Path, data) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data))
    return path


def write_karpathy(paths: Dict[str, Path], out_file: PathLike, dataset: str = "synthetic") -> Path:
    """Write ``generate()``'s dataset as one Karpathy-layout file; images stay where they are."""
    images, sentid = [], 0
    for imgid, (split, rec, caps) in enumerate(_images(paths)):
        ids = list(range(sentid, sentid + len(caps)))
        sentid += len(caps)
        images.append({"filename": rec["image"], "imgid": imgid, "split": split, "sentids": ids,
                       "sentences": [{"raw": _raw(c), "tokens": c.split(), "imgid": imgid, "sentid": s}
                                     for c, s in zip(caps, ids)]})
    return _write_json(Path(out_file), {"images": images, "dataset": dataset})


def write_nwpu(paths: Dict[str, Path], out_dir: PathLike) -> Dict[str, Path]:
    """Write ``generate()``'s dataset in the NWPU-Captions layout under ``out_dir``: returns
    ``{"annotations": out_dir/dataset_nwpu.json, "image_root": out_dir/images}``."""
    out = Path(out_dir)
    root = out / "images"
    classes: Dict[str, list] = {}
    for imgid, (split, rec, caps) in enumerate(_images(paths)):
        label = rec.get("label_name", "unlabelled")
        target = root / label / rec["image"]
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(Path(paths["image_root"]) / rec["image"], target)
            except OSError:  # another file system, or no hard links
                shutil.copy2(Path(paths["image_root"]) / rec["image"], target)
        raws = {("raw" if k == 0 else f"raw_{k}"): _raw(c) for k, c in enumerate(caps)}
        classes.setdefault(label, []).append({"filename": rec["image"], "imgid": imgid, "split": split, **raws})
    return {"annotations": _write_json(out / "dataset_nwpu.json", classes), "image_root": root}
