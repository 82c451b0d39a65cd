"""A small synthetic aerial dataset, written in the RSITMD layout.

Each scene is a top-down rendering: a ground cover (farmland, meadow, desert, forest, bare
soil), and a random choice of water (a river or a lake), a road, houses (a few or many, with
red, white or dark roofs) and scattered trees. Five captions per image, each naming everything
in the scene in its own words and order. Everything is drawn from one seed, so the same call
writes the same files.

The world is built to be learnable in a couple of CPU minutes by a small random-initialised
CLIP whose backbone stays frozen (the demo):
- every caption is a full description, so a caption singles out its image (up to scenes that
  happen to be identical) rather than naming one thing many images share;
- every attribute is a matter of *what* is there, *what colour* and *how much* — what the
  training augmentation keeps (random crop, horizontal flip and RandAugment would contradict
  "at the top left" or "running horizontal"), and what a frozen random tower passes on;
- each attribute has words of its own (no colour word shared by roofs and ground), so even a
  bag of words tells the scenes apart.

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

GROUNDS = {  # name: (rgb, words a caption may use)
    "farmland": ((206, 182, 84), ("farmland", "yellow fields")),
    "meadow": ((112, 176, 72), ("meadow", "green grassland")),
    "desert": ((226, 206, 166), ("desert", "pale sand")),
    "forest": ((34, 80, 40), ("forest", "dense woodland")),
    "soil": ((128, 84, 52), ("bare soil", "brown earth")),
}
ROOF_COLORS = {"red": (200, 40, 36), "white": (246, 246, 246), "dark": (30, 30, 34)}
HOUSES = {"a few": (3, 5), "many": (14, 20)}  # how many houses each word draws
WATER_RGB = (36, 86, 168)
ROAD_RGB = (120, 120, 124)
TREE_RGB = (20, 60, 24)


@dataclass
class Scene:
    ground: str
    water: Optional[str] = None       # "river" | "lake"
    road: bool = False
    houses: Optional[tuple] = None    # (count word, roof colour)
    trees: bool = False
    label: str = field(default="")

    def features(self) -> List[str]:
        """Short phrases, one per thing in the scene besides the ground."""
        out = []
        if self.water:
            out.append(f"a {self.water}")
        if self.road:
            out.append("a road")
        if self.houses:
            out.append(f"{self.houses[0]} houses with {self.houses[1]} roofs")
        if self.trees:
            out.append("scattered trees")
        return out


def _random_scene(rng: random.Random) -> Scene:
    # each attribute close to uniform: the more evenly spread, the fewer identical scenes
    scene = Scene(ground=rng.choice(list(GROUNDS)))
    scene.water = rng.choice((None, "river", "lake"))
    scene.road = rng.random() < 0.5
    if rng.random() < 0.6:
        scene.houses = (rng.choice(list(HOUSES)), rng.choice(list(ROOF_COLORS)))
    scene.trees = scene.ground != "forest" and rng.random() < 0.5
    scene.label = ("residential" if scene.houses else scene.water if scene.water else scene.ground)
    return scene


def _line(draw, size: int, width: int, color, rng: random.Random):
    """A wavy band from one edge to the opposite one, in a random direction."""
    c = rng.randint(size // 4, 3 * size // 4)
    w = size // 10
    pts = [(0, c), (size // 3, c + rng.randint(-w, w)), (2 * size // 3, c + rng.randint(-w, w)), (size, c)]
    if rng.random() < 0.5:
        pts = [(y, x) for x, y in pts]
    draw.line(pts, fill=color, width=width, joint="curve")


def render(scene: Scene, size: int, rng: random.Random) -> Image.Image:
    base = GROUNDS[scene.ground][0]
    img = Image.new("RGB", (size, size), base)
    draw = ImageDraw.Draw(img)
    for _ in range(size // 4):  # texture: fields, canopy, dunes
        x, y = rng.randrange(size), rng.randrange(size)
        jitter = tuple(max(0, min(255, v + rng.randint(-18, 18))) for v in base)
        draw.rectangle([x, y, x + rng.randint(3, 10), y + rng.randint(3, 10)], fill=jitter)
    if scene.water == "lake":  # large enough to survive a half-area random crop
        r = rng.randint(size // 5, size // 4)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        draw.ellipse([cx - r, cy - r * 3 // 4, cx + r, cy + r * 3 // 4], fill=WATER_RGB)
    elif scene.water == "river":
        _line(draw, size, max(4, size // 9), WATER_RGB, rng)
    if scene.road:
        _line(draw, size, max(2, size // 24), ROAD_RGB, rng)
    if scene.houses:
        lo, hi = HOUSES[scene.houses[0]]
        color = ROOF_COLORS[scene.houses[1]]
        side = max(4, size // 12)
        for _ in range(rng.randint(lo, hi)):
            x, y = rng.randrange(size - side), rng.randrange(size - side)
            w, h = rng.randint(side * 2 // 3, side), rng.randint(side * 2 // 3, side)
            draw.rectangle([x, y, x + w, y + h], fill=color, outline=(70, 70, 70))
    if scene.trees:
        for _ in range(rng.randint(8, 14)):
            x, y, r = rng.randrange(size), rng.randrange(size), rng.randint(2, max(2, size // 24))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=TREE_RGB)
    return img.filter(ImageFilter.GaussianBlur(0.6))


TEMPLATES = ("an aerial view of {g} with {f}", "{f} on {g} seen from above", "{g} with {f}",
             "a satellite image of {f} among {g}", "this area of {g} has {f}", "{f} and {g}")
PLAIN = ("an aerial view of {g} with nothing else", "only {g} in this image", "a wide stretch of {g}",
         "plain {g} seen from above", "this image shows {g} and nothing more")


def captions(scene: Scene, rng: random.Random) -> List[str]:
    """Five captions, each naming the ground and everything else there, in its own words and order."""
    names = GROUNDS[scene.ground][1]
    feats = scene.features()
    out = []
    for i, template in enumerate(rng.sample(TEMPLATES if feats else PLAIN, 5)):
        picked = rng.sample(feats, len(feats))  # every feature, in a random order
        listed = ", ".join(picked[:-1]) + (" and " if len(picked) > 1 else "") + picked[-1] if picked else ""
        out.append(template.format(g=names[i % 2], f=listed))
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
