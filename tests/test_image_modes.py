"""Images that cannot be read faithfully as 8-bit RGB: 16-bit and float images (which PIL's
convert("RGB") clips instead of scaling) and images past PIL's decompression-bomb limit (a
DecompressionBombError, not an OSError). Refused with a message naming the image and what to do,
in data check / train / eval's up-front image check and in the dataset loader (harma_fast/io.py
open_rgb); the serving side is tested in test_serving_edges.py."""
import json

import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from harma_fast.cli import main
from harma_fast.data.annotations import AnnotationError, load_eval_records, load_train_records
from harma_fast.data.datasets import ImageDataset, TrainDataset, load_rgb
from harma_fast.errors import HarmaError

EIGHT_BIT = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"]
WIDE = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}


def wide_image(path, mode):
    """A 12-bit sensor tile in a 16-bit file, in 32-bit integers, or reflectance 0..1 in floats."""
    rng = np.random.default_rng(0)
    data = rng.random((16, 16), dtype=np.float32) if mode == "F" else rng.integers(0, 4000, (16, 16))
    Image.frombytes(mode, (16, 16), np.asarray(data).astype(WIDE[mode]).tobytes()).save(path)
    with Image.open(path) as img:
        assert img.mode == mode, f"the test file was meant to open in mode {mode}, not {img.mode}"
    return path


def eight_bit_image(path, mode, size=16):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    image.save(path)
    return path


def suffix(mode):
    return ".tif" if mode in ("PA", "CMYK", "YCbCr", "I;16B") else ".png"


@pytest.mark.parametrize("mode", EIGHT_BIT)
def test_eight_bit_images_read_as_before(tmp_path, mode):
    path = eight_bit_image(tmp_path / f"a{suffix(mode)}", mode)
    with Image.open(path) as img:
        assert img.mode == mode
    with Image.open(path) as img:
        want = np.asarray(img.convert("RGB"))
    got = load_rgb(path)
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), want)


@pytest.mark.parametrize("mode, ext, kind", [("I;16", ".png", "16-bit"), ("I;16", ".tif", "16-bit"),
                                             ("I;16B", ".tif", "16-bit"), ("I", ".tif", "32-bit integer"),
                                             ("F", ".tif", "32-bit floating-point")])
def test_16_bit_and_float_images_are_refused_not_clipped(tmp_path, mode, ext, kind):
    # convert("RGB") clipped them: 0..4000 came out nearly white, 0..1 black, and data check said "no problems"
    path = wide_image(tmp_path / f"wide{ext}", mode)
    with pytest.raises(HarmaError, match=rf"image .*{path.name} is a {kind} single-band image \(PIL mode "
                                             rf"{mode}\); harma_fast reads 8-bit images: convert it to 8-bit RGB"):
        load_rgb(path)


def dataset(tmp_path, names):
    """An evaluation file of ``names`` (under tmp_path/images, made by the caller)."""
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": n, "caption": [f"a scene {i}", "a tile"]} for i, n in enumerate(names)]))
    return test, tmp_path / "images"


def assert_reported(test, images, capsys):
    """data check lists the problems (exit 2), eval says so in one line (exit 2): no traceback."""
    assert main(["data", "check", str(test), "--image-root", str(images)]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err and "internal error" not in out.out + out.err
    assert main(["eval", "--test-file", str(test), "--image-root", str(images), "--model", "HarMA-Tiny"]) == 2
    err = capsys.readouterr().err
    assert "harma-fast eval: error:" in err and "Traceback" not in err
    return out.out + out.err


def test_the_image_check_reports_16_bit_and_float_images(tmp_path, capsys):
    # data check said "no problems found", and training and evaluation used the clipped pixels
    (tmp_path / "images").mkdir()
    wide_image(tmp_path / "images" / "u16.tif", "I;16")
    wide_image(tmp_path / "images" / "f32.tif", "F")
    eight_bit_image(tmp_path / "images" / "ok.png", "P")
    test, images = dataset(tmp_path, ["u16.tif", "f32.tif", "ok.png"])
    with pytest.raises(AnnotationError) as info:
        load_eval_records(test, images)
    text = str(info.value)
    assert "2 problem(s) in annotation file" in text and "test.json" in text and "ok.png" not in text
    assert ("record 0, field 'image': image 'u16.tif' is a 16-bit single-band image (PIL mode I;16); harma_fast "
            "reads 8-bit images: convert it to 8-bit RGB first, with the scaling your sensor needs") in text
    assert "record 1, field 'image': image 'f32.tif' is a 32-bit floating-point single-band image (PIL mode F)" in text
    assert "PIL mode I;16" in assert_reported(test, images, capsys)


def test_the_image_check_reports_images_past_the_decompression_bomb_limit(tmp_path, monkeypatch, capsys):
    # a DecompressionBombError is not an OSError: data check, train and eval died with a traceback
    (tmp_path / "images").mkdir()
    eight_bit_image(tmp_path / "images" / "big.png", "RGB", size=32)  # 1024 px: past a limit of 2 x 300
    eight_bit_image(tmp_path / "images" / "ok.png", "RGB")  # 256 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    test, images = dataset(tmp_path, ["ok.png", "big.png"])
    with pytest.raises(AnnotationError) as info:
        load_eval_records(test, images)
    text = str(info.value)
    assert "1 problem(s) in annotation file" in text
    assert ("record 1, field 'image': image 'big.png' is 32x32 px, past PIL's decompression-bomb limit of 600 pixels"
            " (twice PIL.Image.MAX_IMAGE_PIXELS), too large to decode safely: cut the scene into tiles") in text
    assert "past PIL's decompression-bomb limit" in assert_reported(test, images, capsys)


def train_records(tmp_path, names):
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"image": n, "caption": f"a scene {i}", "image_id": i} for i, n in enumerate(names)]))
    return load_train_records(train, tmp_path, check_images=False)


def test_the_dataset_loader_refuses_16_bit_images_when_the_check_was_skipped(tmp_path):
    wide_image(tmp_path / "u16.tif", "I;16")
    wide_image(tmp_path / "f32.tif", "F")
    dataset = TrainDataset(train_records(tmp_path, ["u16.tif", "f32.tif"]), transform=lambda image: image)
    with pytest.raises(HarmaError, match=r"u16.tif is a 16-bit single-band image \(PIL mode I;16\)"):
        dataset[0]
    with pytest.raises(HarmaError, match=r"f32.tif is a 32-bit floating-point single-band image \(PIL mode F\)"):
        dataset[1]


def test_the_dataset_loader_refuses_images_past_the_bomb_limit_when_the_check_was_skipped(tmp_path, monkeypatch):
    eight_bit_image(tmp_path / "big.png", "RGB", size=32)
    records = train_records(tmp_path, ["big.png"])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    with pytest.raises(HarmaError, match=r"big.png is 32x32 px, past PIL's decompression-bomb limit"):
        TrainDataset(records, transform=lambda image: image)[0]
    test = tmp_path / "test.json"
    test.write_text(json.dumps([{"image": "big.png", "caption": ["a field", "a meadow"]}]))
    with pytest.raises(HarmaError, match="big.png is 32x32 px"):
        ImageDataset(load_eval_records(test, tmp_path, check_images=False), transform=lambda image: image)[0]


def test_a_loader_worker_reports_the_image_in_one_line(tmp_path):
    # training loads images in worker processes; torch re-raises their error with the worker's traceback
    wide_image(tmp_path / "u16.tif", "I;16")
    dataset = TrainDataset(train_records(tmp_path, ["u16.tif"]), transform=lambda image: 0)
    with pytest.raises(HarmaError) as info:
        next(iter(DataLoader(dataset, batch_size=1, num_workers=1)))
    message = str(info.value)
    assert isinstance(info.value, HarmaError) and "Traceback" not in message and "\n" not in message
    assert message.startswith(f"image {tmp_path / 'u16.tif'} is a 16-bit single-band image (PIL mode I;16)")
    assert message.endswith("(read in DataLoader worker process 0)")
