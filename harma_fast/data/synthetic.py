"""A small synthetic aerial dataset, written in the RSITMD layout.

Each scene is a top-down rendering: a ground cover (field, forest, desert, grass) of some
colour, and a random choice of a river, a road, a lake, a cluster of roofs and patches of
trees, each with a colour, a position or an orientation. Five templated captions per image
say what is there. Everything is drawn from one seed, so the same call writes the same files.

    images/00000.tif ...                       RGB TIFF, as RSITMD ships
    train.json  [{"image", "caption", "image_id", "label_name", "label"}, ...]   one per caption
    val.json, test.json  [{"image", "caption": [5 captions], "label_name", "label"}, ...]
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from PIL import Image, ImageDraw, ImageFilter

from ..io import PathLike, atomic_path

GROUNDS = {  # name: (rgb, caption words)
    "farmland": ((196, 176, 92), "yellow farmland"),
    "meadow": ((104, 160, 72), "green meadow"),
    "desert": ((214, 190, 150), "sandy desert"),
    "forest": ((40, 92, 44), "dense forest"),
}
ROOF_COLORS = {"red": (178, 52, 44), "gray": (140, 140, 146), "blue": (60, 90, 170), "white": (235, 235, 235)}
ORIENTATIONS = ("horizontal", "vertical", "diagonal")
POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")
COUNTS = {"a few": (2, 4), "many": (8, 14)}


@dataclass
class Scene:
    ground: str
    river: Optional[str] = None       # orientation
    road: Optional[str] = None        # orientation
    lake: Optional[str] = None        # position
    roofs: Optional[tuple] = None     # (count word, colour)
    trees: bool = False
    label: str = field(default="")

    def features(self) -> List[str]:
        """Short phrases, one per thing in the scene."""
        out = []
        if self.river:
            out.append(f"a river running {self.river}")
        if self.road:
            out.append(f"a {self.road} road")
        if self.lake:
            out.append(f"a lake at the {self.lake}")
        if self.roofs:
            out.append(f"{self.roofs[0]} {self.roofs[1]} roofs")
        if self.trees:
            out.append("scattered trees")
        return out


def _random_scene(rng: random.Random) -> Scene:
    scene = Scene(ground=rng.choice(list(GROUNDS)))
    if rng.random() < 0.5:
        scene.river = rng.choice(ORIENTATIONS)
    if rng.random() < 0.5:
        scene.road = rng.choice(ORIENTATIONS)
    if rng.random() < 0.4:
        scene.lake = rng.choice(POSITIONS)
    if rng.random() < 0.5:
        scene.roofs = (rng.choice(list(COUNTS)), rng.choice(list(ROOF_COLORS)))
    scene.trees = scene.ground != "forest" and rng.random() < 0.4
    scene.label = ("residential" if scene.roofs else "river" if scene.river else "lake" if scene.lake
                   else scene.ground)
    return scene


def _line(draw, orientation: str, size: int, width: int, color, rng: random.Random):
    c = rng.randint(size // 4, 3 * size // 4)
    if orientation == "horizontal":
        pts = [(0, c), (size // 3, c + rng.randint(-4, 4)), (2 * size // 3, c + rng.randint(-4, 4)), (size, c)]
    elif orientation == "vertical":
        pts = [(c, 0), (c + rng.randint(-4, 4), size // 3), (c + rng.randint(-4, 4), 2 * size // 3), (c, size)]
    else:
        pts = [(0, 0), (size // 2 + rng.randint(-6, 6), size // 2), (size, size)] if rng.random() < 0.5 else \
              [(0, size), (size // 2, size // 2 + rng.randint(-6, 6)), (size, 0)]
    draw.line(pts, fill=color, width=width, joint="curve")


def _corner(position: str, size: int):
    q = size // 4
    return {"top left": (q, q), "top right": (3 * q, q), "bottom left": (q, 3 * q),
            "bottom right": (3 * q, 3 * q), "center": (2 * q, 2 * q)}[position]


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    base = GROUNDS[scene.ground][0]
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(size // 4):  # texture: fields, canopy, dunes
        x, y = rng.randrange(size), rng.randrange(size)
        jitter = tuple(max(0, min(255, v + rng.randint(-18, 18))) for v in base)
        draw.rectangle([x, y, x + rng.randint(3, 10), y + rng.randint(3, 10)], fill=jitter)
    if scene.lake:
        cx, cy = _corner(scene.lake, size)
        r = size // 7
        draw.ellipse([cx - r, cy - r * 3 // 4, cx + r, cy + r * 3 // 4], fill=(40, 84, 150))
    if scene.river:
        _line(draw, scene.river, size, max(3, size // 14), (52, 104, 168), rng)
    if scene.road:
        _line(draw, scene.road, size, max(2, size // 28), (92, 92, 92), rng)
    if scene.roofs:
        lo, hi = COUNTS[scene.roofs[0]]
        color = ROOF_COLORS[scene.roofs[1]]
        for _ in range(rng.randint(lo, hi)):
            x, y = rng.randrange(size - 8), rng.randrange(size - 8)
            w, h = rng.randint(4, 8), rng.randint(4, 8)
            draw.rectangle([x, y, x + w, y + h], fill=color, outline=(30, 30, 30))
    if scene.trees:
        for _ in range(rng.randint(5, 12)):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, 4)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(28, 76, 30))
    return img.filter(ImageFilter.GaussianBlur(0.6))


def captions(scene: Scene, rng: random.Random) -> List[str]:
    """Five captions, each naming the ground and a different selection of what is there."""
    ground = GROUNDS[scene.ground][1]
    feats = scene.features()
    out = [f"an aerial view of {ground}" + (f" with {' and '.join(feats)}" if feats else ""),
           f"{ground} seen from above"]
    if not feats:
        out += [f"a wide stretch of {ground} with nothing else", f"only {ground} in this image",
                f"this image shows plain {ground}"]
        return out
    out[1] += f", showing {rng.choice(feats)}"
    for _ in range(3):
        k = rng.randint(1, len(feats))
        picked = rng.sample(feats, k)
        template = rng.choice(["the scene has {f} in the {g}", "{f} on {g}", "the image shows {f} among {g}"])
        out.append(template.format(f=" and ".join(picked), g=ground))
    return out


def generate(out_dir: PathLike, n_train: int = 600, n_val: int = 100, n_test: int = 100, image_size: int = 96,
             seed: int = 0) -> Dict[str, Path]:
    """Write the dataset under ``out_dir``; returns the paths of the three files and the image root."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    labels: Dict[str, int] = {}
    splits = {"train": [], "val": [], "test": []}
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    index = 0
    for split, count in sizes.items():
        for _ in range(count):
            scene = _random_scene(rng)
            name = f"{index:05d}.tif"
            render(scene, image_size, rng).save(out / "images" / name)
            caps = captions(scene, rng)
            label = labels.setdefault(scene.label, len(labels))
            if split == "train":
                splits[split] += [{"image": name, "caption": c, "image_id": index, "label_name": scene.label,
                                   "label": label} for c in caps]
            else:
                splits[split].append({"image": name, "caption": caps, "label_name": scene.label, "label": label})
            index += 1
    paths = {"image_root": out / "images"}
    for split, records in splits.items():
        paths[split] = out / f"{split}.json"
        with atomic_path(paths[split]) as tmp:
            tmp.write_text(json.dumps(records, indent=1))
    return paths
