"""Serving and search at the edges: empty batches, threads, huge or integer images, edited
export metadata, foreign or damaged index files, refused exports (export/runtime.py, search.py)."""
import json
import re
import shutil
import threading

import numpy as np
import pytest

from harma_fast.errors import ConfigError, OutputPathError
from helpers import tiny_model

pytest.importorskip("onnxruntime")
from harma_fast.export import ExportFileError, GalleryIndex, OrtEncoder, export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{kind: export folder} of one tiny model: free batch axis, fixed batch of 3, int8."""
    model, root = tiny_model(), tmp_path_factory.mktemp("exports")
    plans = {"dynamic": {}, "static": {"batch_size": 3}, "int8": {"dtype": "int8"}}
    for kind, options in plans.items():
        export_onnx(model, root / kind, model_name="HarMA-Tiny", check=False, **options)
    return {kind: root / kind for kind in plans}


def copy_export(src, dst, **edits):
    """A copy of an export with harma.json fields replaced (``image__size=...`` edits a nested field)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "harma.json").read_text())
    for key, value in edits.items():
        *parents, leaf = key.split("__")
        node = meta
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    (dst / "harma.json").write_text(json.dumps(meta))
    return dst


def write_image(path, size):
    from PIL import Image

    rng = np.random.default_rng(len(str(path)))
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize("kind", ["dynamic", "static", "int8"])
def test_empty_batches_give_no_rows(exports, kind):
    # ONNX Runtime's int8 kernels divide by the row count: 0 rows killed the process (SIGFPE)
    enc = OrtEncoder(exports[kind])
    size, length, dim = enc.meta["image"]["size"], enc.meta["text"]["context_length"], enc.embed_dim
    assert enc.encode_pixels(np.zeros((0, 3, size, size), np.float32)).shape == (0, dim)
    assert enc.encode_tokens(np.zeros((0, length), np.int64)).shape == (0, dim)
    assert enc.encode_texts([]).shape == (0, dim) and enc.encode_images([]).shape == (0, dim)


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_files_and_captions_embed_as_pytorch_evaluates_them(exports, tmp_path, kind):
    # end to end, as a user calls it: image files of odd sizes and modes, captions with punctuation and
    # past the context, against evaluation's pipeline in PyTorch (open_rgb, eval_transform, encode_*)
    import torch
    from PIL import Image

    from harma_fast.data.layouts import clean_caption
    from harma_fast.data.transforms import eval_transform, model_image_spec
    from harma_fast.io import open_rgb
    from harma_fast.models import get_tokenizer

    model = tiny_model()  # the weights the fixture exported
    rng = np.random.default_rng(5)
    paths = []
    for i, (shape, mode) in enumerate([((31, 57, 3), "RGB"), ((120, 90, 4), "RGBA"), ((9, 9), "L"), ((64, 64, 3), "P")]):
        array = rng.integers(0, 256, shape, dtype=np.uint8)
        image = Image.fromarray(array[..., :3] if mode == "P" else array)
        paths.append(tmp_path / f"{i}.png")
        (image.convert("P") if mode == "P" else image).save(paths[-1])
    captions = ["A river, crossing farmland!", " ".join(["many red roofs next to a wide river"] * 12), "lake"]
    enc = OrtEncoder(exports[kind])
    transform = eval_transform(*model_image_spec(model))
    with torch.no_grad():
        want_images = model.encode_image(torch.stack([transform(open_rgb(p)) for p in paths]), normalize=True)
        tokens = get_tokenizer("HarMA-Tiny")([clean_caption(c, max_words=None) for c in captions])
        want_texts = model.encode_text(tokens, normalize=True)
    for got, want in ((enc.encode_images(paths, batch_size=3), want_images), (enc.encode_texts(captions), want_texts)):
        assert got.dtype == np.float32 and got.shape == tuple(want.shape)
        assert np.abs(got - want.numpy()).max() <= 1e-5
        assert np.abs(np.linalg.norm(got, axis=1) - 1).max() <= 1e-5


def test_a_fixed_batch_encoder_can_be_shared_by_threads(exports):
    # the bound input and output buffers are shared: without a lock, threads read each other's rows
    enc = OrtEncoder(exports["static"])
    size = enc.meta["image"]["size"]
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((5, 3, size, size)).astype(np.float32) for _ in range(6)]
    want = [enc.encode_pixels(b) for b in batches]
    shared = OrtEncoder(exports["static"])  # its session is created by the threads themselves
    got, errors = {}, []

    def work(i):
        try:
            for _ in range(5):
                got[i] = shared.encode_pixels(batches[i])
                assert np.array_equal(got[i], want[i]), f"thread {i} got another batch's embeddings"
        except AssertionError as err:  # pragma: no cover - the failure is reported below
            errors.append(str(err))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(got) == len(batches)


def test_images_that_cannot_be_used_are_refused_clearly(exports, tmp_path, monkeypatch):
    from PIL import Image

    enc = OrtEncoder(exports["dynamic"])
    size = enc.meta["image"]["size"]
    raw = np.zeros((2, 3, size, size), np.uint8)  # 0..255 pixels, not normalised: garbage embeddings
    with pytest.raises(ValueError, match="pixels must be normalised floats .* got uint8; pass raw images to "
                                         "encode_images"):
        enc.encode_pixels(raw)
    # an image past PIL's decompression-bomb limit raised a DecompressionBombError traceback
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = tmp_path / "gallery"
    folder.mkdir()
    write_image(folder / "small.png", 16)
    huge = write_image(folder / "huge.png", 64)  # 4096 pixels: over twice the limit
    with pytest.raises(ValueError, match="huge.png is 64x64 px, past PIL's decompression-bomb limit of 2,000 "
                                         "pixels .*too large to decode safely: .*MAX_IMAGE_PIXELS"):
        enc.encode_images([huge])
    index = GalleryIndex(folder, enc, tmp_path / "index.npz")  # the search skips it and says so
    assert index.names == ["small.png"] and "too large" in index.skipped["huge.png"]
    assert "1 unreadable" in index.status


def test_16_bit_and_float_images_are_refused_not_clipped(exports, tmp_path):
    # convert("RGB") clipped them: 12-bit data in a 16-bit file was embedded nearly white, floats 0..1 black
    from PIL import Image

    enc = OrtEncoder(exports["dynamic"])
    rng = np.random.default_rng(0)
    folder = tmp_path / "gallery"
    folder.mkdir()
    write_image(folder / "rgb.png", 16)
    Image.fromarray(rng.integers(0, 4000, (16, 16)).astype(np.uint16)).save(folder / "u16.tif")
    Image.fromarray(rng.random((16, 16), dtype=np.float32)).save(folder / "f32.tif")
    advice = "harma_fast reads 8-bit images: convert it to 8-bit RGB first, with the scaling your sensor needs"
    with Image.open(folder / "u16.tif") as img:
        with pytest.raises(ValueError, match=r"the PIL image given is a 16-bit single-band image \(PIL mode I;16\); "
                                             + advice):
            enc.encode_images([img])
    with pytest.raises(ValueError, match=r"f32.tif is a 32-bit floating-point single-band image \(PIL mode F\)"):
        enc.encode_images([folder / "f32.tif"])
    with Image.open(folder / "rgb.png") as img:  # 8-bit images as before
        assert np.array_equal(enc.preprocess(img.convert("L")), enc.preprocess(img.convert("L").convert("RGB")))
    index = GalleryIndex(folder, enc, tmp_path / "index.npz")  # the search skips them and says why
    assert index.names == ["rgb.png"] and "2 unreadable" in index.status
    assert "PIL mode I;16" in index.skipped["u16.tif"] and "PIL mode F" in index.skipped["f32.tif"]


@pytest.mark.parametrize("edits, match", [
    ({"image__size": 48}, r"its input has shape .*harma.json describes input 'pixels'"),
    ({"text__context_length": 12, "text__tokenizer__context_length": 12},
     r"its input has shape .*harma.json describes input 'tokens'"),
    ({"embed_dim": 7}, r"its output is 'embeddings' .*width 7"),
    ({"towers": {"image": "text.onnx", "text": "image.onnx"}}, "its input is 'tokens'"),
])
def test_metadata_that_does_not_match_the_graphs_is_refused(exports, tmp_path, edits, match):
    bad = OrtEncoder(copy_export(exports["dynamic"], tmp_path / "edited", **edits))
    with pytest.raises(ExportFileError, match=match + ".*re-export the model"):
        bad.encode_images([write_image(tmp_path / "a.png", 20)])
        bad.encode_tokens(np.zeros((1, bad.meta["text"]["context_length"]), np.int64))


def test_a_fixed_batch_that_does_not_match_is_refused(exports, tmp_path):
    bad = OrtEncoder(copy_export(exports["static"], tmp_path / "edited", batch_size=4))
    with pytest.raises(ExportFileError, match=r"with batch 4"):
        bad.encode_texts(["a lake"])
    # a fixed-batch graph copied into a free-batch export ran, then failed inside ONNX Runtime
    mixed = copy_export(exports["dynamic"], tmp_path / "mixed")
    shutil.copy(exports["static"] / "image.onnx", mixed / "image.onnx")
    with pytest.raises(ExportFileError, match=r"image.onnx does not match .*input has shape \(3, 3, .*with a free "
                                              r"batch axis.*re-export the model"):
        OrtEncoder(mixed).encode_images([write_image(tmp_path / "a.png", 16)])


def test_a_graph_of_another_dtype_is_refused(exports, tmp_path):
    # float32 in and out whatever the weights: an int8 or fp16 graph in an fp32 export ran unnoticed
    mixed = copy_export(exports["dynamic"], tmp_path / "mixed")
    shutil.copy(exports["int8"] / "text.onnx", mixed / "text.onnx")
    with pytest.raises(ExportFileError, match="text.onnx does not match .*it is an int8 graph, harma.json says dtype "
                                              "fp32.*re-export the model"):
        OrtEncoder(mixed).encode_texts("a lake")
    with pytest.raises(ExportFileError, match="it is an fp32 graph, harma.json says dtype fp16"):
        OrtEncoder(copy_export(exports["dynamic"], tmp_path / "fp16", dtype="fp16")).encode_texts("a lake")


def test_a_graph_of_another_export_with_the_same_shapes_is_refused(exports, tmp_path):
    # shapes, batch axis and dtype alike: a graph copied from an export of other weights ran unnoticed,
    # its embeddings compared with the other tower's (and a search index of the old graph reused)
    other = copy_export(exports["dynamic"], tmp_path / "other", export_id="0" * 32)  # harma.json of another export
    for encode in (lambda enc: enc.encode_texts("a lake"), lambda enc: enc.encode_images([write_image(
            tmp_path / "a.png", 16)])):
        with pytest.raises(ExportFileError, match=r"\.onnx does not match .*it was written by another export \(export "
                                                  r"id [0-9a-f]{32}, harma.json's is 0{32}\).*re-export the model"):
            encode(OrtEncoder(other))


@pytest.mark.parametrize("edits, match", [
    ({"text__tokenizer": "clip"}, "'text.tokenizer' is 'clip', not an object"),
    ({"text__tokenizer__context_length": "32"}, "'text.tokenizer.context_length' is '32', not a positive integer"),
    ({"text__tokenizer__vocab": None}, "'text.tokenizer.vocab' is None, not a file name"),
    ({"text__tokenizer__context_length": 9}, "the export is inconsistent: the tokenizer makes 9 tokens"),
    ({"image__mean": [0.5, float("nan"), 0.5]}, r"'image.mean' is \[0.5, nan, 0.5\], not three finite numbers"),
    ({"image__std": [0.5, float("inf"), 0.5]}, "'image.std' is .*inf.*, not three finite numbers"),
    ({"image__std": [0.5, -0.2, 0.5]}, "'image.std' holds a zero or a negative value"),
    ({"export_id": 7}, "'export_id' is 7, not a string"),
])
def test_tampered_metadata_is_refused_on_opening(exports, tmp_path, edits, match):
    # each was an AttributeError, TypeError or KeyError later on, or NaN embeddings
    bad = copy_export(exports["dynamic"], tmp_path / "edited", **edits)
    with pytest.raises(ExportFileError, match=match + ".*edited or damaged"):
        OrtEncoder(bad)


def test_a_missing_or_damaged_tokenizer_file_says_the_export_is_damaged(exports, tmp_path):
    from harma_fast.export.runtime import ExportDirError

    bad = copy_export(exports["dynamic"], tmp_path / "edited")
    meta = json.loads((bad / "harma.json").read_text())
    del meta["export_id"]  # a KeyError in search
    (bad / "harma.json").write_text(json.dumps(meta))
    with pytest.raises(ExportFileError, match="lacks export_id"):
        OrtEncoder(bad)
    shutil.copy(exports["dynamic"] / "harma.json", bad / "harma.json")
    vocab = bad / "bpe_simple_vocab_16e6.txt.gz"
    for damage in (b"", b"not gzip", vocab.read_bytes()[:4000]):
        vocab.write_bytes(damage)
        with pytest.raises(ExportFileError, match="tokenizer file of the export .* the export is damaged; re-export"):
            OrtEncoder(bad)
    vocab.unlink()
    with pytest.raises(ExportDirError, match="lists the tokenizer file bpe_simple_vocab_16e6.txt.gz, which is missing"):
        OrtEncoder(bad)


@pytest.mark.parametrize("edits, match", [
    ({"embed_dim": "512"}, "'embed_dim' is '512', not a positive integer"),
    ({"image__size": -3}, "'image.size' is -3"),
    ({"image__std": [0.5, 0, 0.5]}, "'image.std' holds a zero"),
    ({"image__mean": [0.5]}, r"'image.mean' is \[0.5\], not three finite numbers"),
    ({"dtype": "int4"}, "'dtype' is 'int4'"),
    ({"towers": ["image.onnx"]}, "'towers' must map"),
])
def test_ill_typed_metadata_is_refused_on_opening(exports, tmp_path, edits, match):
    bad = copy_export(exports["dynamic"], tmp_path / "edited", **edits)
    with pytest.raises(ExportFileError, match=match + ".*edited or damaged"):
        OrtEncoder(bad)


def test_an_index_path_never_overwrites_a_users_npz(exports, tmp_path):
    folder = tmp_path / "gallery"
    folder.mkdir()
    write_image(folder / "a.png", 16)
    mine = tmp_path / "mine.npz"
    np.savez(mine, weights=np.arange(5))
    before = mine.read_bytes()
    with pytest.raises(OutputPathError, match="mine.npz is a .npz file but not a harma_fast search index"):
        GalleryIndex(folder, OrtEncoder(exports["dynamic"]), mine)
    assert mine.read_bytes() == before
    for name, write in (("array.npz", lambda p: np.save(open(p, "wb"), np.arange(3))),  # a lone .npy array
                        ("notes.npz", lambda p: p.write_text("my notes"))):
        other = tmp_path / name
        write(other)
        kept = other.read_bytes()
        with pytest.raises(OutputPathError, match="not a harma_fast search index"):
            GalleryIndex(folder, OrtEncoder(exports["dynamic"]), other)
        assert other.read_bytes() == kept


@pytest.mark.parametrize("damage", ["truncated", "empty", "a list manifest"])
def test_a_damaged_index_is_rebuilt(exports, tmp_path, damage):
    folder = tmp_path / "gallery"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"{i}.png", 16 + i)
    enc, path = OrtEncoder(exports["dynamic"]), tmp_path / "index.npz"
    first = GalleryIndex(folder, enc, path)
    assert first.status == "index built: 3 embedded, 0 removed, 3 in all"  # said "rebuilt" with no index before
    data = path.read_bytes()
    if damage == "a list manifest":
        np.savez(path, embeddings=first.embeddings, meta=np.array(json.dumps(["not", "a", "dict"])))
    else:
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"")
    again = GalleryIndex(folder, enc, path)
    assert again.status.startswith("index rebuilt: 3 embedded") and "the index file was unreadable" in again.status
    assert np.array_equal(again.embeddings, first.embeddings)
    assert GalleryIndex(folder, enc, path).status == "index reused: 3 images unchanged"


@pytest.mark.parametrize("where", ["_tokenizer_spec", "_export_tower"])
def test_a_refused_export_leaves_no_folder(tmp_path, monkeypatch, where):
    # refused while preparing the model (before the folder is made) or while writing it: neither
    # the folder nor the parents it made are left behind
    import harma_fast.export.onnx_export as ox

    def refuse(*args, **kwargs):
        raise RuntimeError("refused")
    monkeypatch.setattr(ox, where, refuse)
    with pytest.raises(RuntimeError, match="refused"):
        export_onnx(tiny_model(), tmp_path / "new" / "deeper" / "onnx", model_name="HarMA-Tiny")
    assert list(tmp_path.iterdir()) == []


def test_which_models_are_served_with_clip_bpe_is_read_from_their_config(monkeypatch):
    import open_clip

    from harma_fast.export.onnx_export import _uses_clip_bpe

    def no_hub(*args, **kwargs):  # building SigLIP's tokenizer downloads it from the hub
        raise AssertionError("open_clip.get_tokenizer was called")
    monkeypatch.setattr(open_clip, "get_tokenizer", no_hub)
    assert _uses_clip_bpe("ViT-B-32") and _uses_clip_bpe("HarMA-Tiny") and _uses_clip_bpe(None)
    assert _uses_clip_bpe("C:\\models\\my-clip")  # a local folder's path is not a hub name
    for name in ("ViT-B-16-SigLIP", "ViT-B-16-SigLIP2", "hf-hub:someone/model"):
        assert not _uses_clip_bpe(name), name


def test_graphs_past_protobufs_2_gib_keep_their_weights_beside_them(tmp_path, monkeypatch):
    # ViT-bigG's towers pass protobuf's 2 GiB: the graph keeps its weights in <name>.data, and its
    # int8 quantization (whose intermediate graph is three quarters fp32) must do the same
    import harma_fast.export.onnx_export as ox

    monkeypatch.setattr(ox, "LARGE_GRAPH_BYTES", 0)  # every graph counts as large
    for dtype in ("fp32", "int8"):
        out = tmp_path / dtype
        meta = export_onnx(tiny_model(), out, model_name="HarMA-Tiny", dtype=dtype)  # parity checked
        assert all(row["ok"] for rows in meta["parity"].values() for row in rows)
        graphs = {f.name for f in out.iterdir()} - {"harma.json", "bpe_simple_vocab_16e6.txt.gz"}
        assert graphs == {"image.onnx", "image.onnx.data", "text.onnx", "text.onnx.data"}, dtype
        assert OrtEncoder(out).encode_texts(["a lake"]).shape == (1, meta["embed_dim"])


def test_a_graph_whose_weights_file_is_missing_names_it(exports, tmp_path):
    # a graph past 2 GiB copied without its <name>.data: ONNX Runtime's "Cannot parse data from external
    # tensors", and advice to add --plain-onnx
    onnx = pytest.importorskip("onnx")
    from harma_fast.export.runtime import ExportDirError

    out = copy_export(exports["dynamic"], tmp_path / "copy")
    graph = onnx.load(str(out / "text.onnx"))
    onnx.save_model(graph, str(out / "text.onnx"), save_as_external_data=True, location="text.onnx.data")
    assert OrtEncoder(out).encode_texts("a lake").shape == (1, OrtEncoder(out).embed_dim)  # with its weights: as before
    (out / "text.onnx.data").unlink()
    with pytest.raises(ExportDirError, match=r"text.onnx keeps its weights in text.onnx.data, which is missing from "
                                             r".*copy it there with the graph, or re-export"):
        OrtEncoder(out).encode_texts("a lake")


def test_a_fixed_batch_export_runs_on_the_provider_its_session_has(exports):
    # CUDA listed first on a CPU-only onnxruntime: the bound buffers were CUDA memory ("Can't
    # allocate memory on the CUDA device"); int8 runs on the CPU provider whatever is listed
    import onnxruntime as ort

    cuda_first = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    want = OrtEncoder(exports["static"]).encode_texts(["a lake", "a road"])
    assert np.array_equal(OrtEncoder(exports["static"], providers=cuda_first).encode_texts(["a lake", "a road"]), want)
    one = OrtEncoder(exports["dynamic"], providers="CPUExecutionProvider")  # one name, not its characters
    assert one.providers == ["CPUExecutionProvider"] and one.encode_texts("a lake").shape == (1, one.embed_dim)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        with pytest.warns(UserWarning, match="int8 graphs run on the CPU provider only"):
            assert OrtEncoder(exports["int8"], providers=cuda_first).providers == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match="none of the providers .*'NoSuchExecutionProvider'.* is available"):
        OrtEncoder(exports["dynamic"], providers=["NoSuchExecutionProvider"])


def test_encoder_arguments_are_refused_naming_what_is_wrong(exports, tmp_path):
    enc = OrtEncoder(exports["dynamic"])
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ConfigError, match=f"batch_size must be an integer >= 1, got {bad!r}"):
            enc.encode_texts(["a lake"], batch_size=bad)
        with pytest.raises(ConfigError, match="batch_size must be an integer >= 1"):
            enc.encode_images([], batch_size=bad)
    for text in (None, 3):
        with pytest.raises(ConfigError, match=rf"texts\[1\] is {text!r}, not a string"):
            enc.encode_texts(["a lake", text])
    with pytest.raises(ConfigError, match="an image must be a file path or a PIL image, got ndarray"):
        enc.encode_images([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(FileNotFoundError, match="is a folder, not an image file"):
        enc.encode_images([tmp_path])
    image = write_image(tmp_path / "a.png", 16)
    assert np.array_equal(enc.encode_images(str(image)), enc.encode_images([image]))  # one path, not characters
    with pytest.raises(FileNotFoundError, match="harma.json is a file, not a folder"):
        OrtEncoder(exports["dynamic"] / "harma.json")


def test_a_bad_thread_count_is_refused_when_the_encoder_is_made(exports):
    # a string or float passed until the first encode, then failed inside ONNX Runtime (TypeError: "incompatible
    # function arguments" and its pybind11 signatures)
    for bad in ("2", 2.5, True, -1):
        with pytest.raises(ConfigError, match=rf"threads must be an integer >= 1 .*got {re.escape(repr(bad))}"):
            OrtEncoder(exports["dynamic"], threads=bad)
    one = OrtEncoder(exports["dynamic"], threads=1)
    assert one.encode_texts("a lake").shape == (1, one.embed_dim)


def test_a_pil_image_whose_file_was_closed_is_refused_clearly(exports, tmp_path):
    from PIL import Image

    path = write_image(tmp_path / "a.png", 16)
    with Image.open(path) as image:  # opened lazily, never decoded: a bare AssertionError from PIL
        pass
    enc = OrtEncoder(exports["dynamic"])
    with pytest.raises(ConfigError, match=r"the PIL image given cannot be decoded \(its file was closed before it was "
                                          r"read\); pass its file path, or load it"):
        enc.encode_images([image])
    with Image.open(path) as image:
        image.load()
    assert np.array_equal(enc.encode_images(image), enc.encode_images(path))


def test_the_index_sees_a_file_replaced_with_its_size_and_mtime_kept(exports, tmp_path):
    # cp -p, rsync -a, tar keep size and mtime: the stale embedding of the old image was reused
    import os

    from PIL import Image

    folder = tmp_path / "gallery"
    folder.mkdir()
    rng = np.random.default_rng(0)
    tile = folder / "a.bmp"  # uncompressed: every 16x16 image has the same size
    for name in ("a.bmp", "b.bmp"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    enc, path = OrtEncoder(exports["dynamic"]), tmp_path / "INDEX.NPZ"  # the suffix in any case
    first = GalleryIndex(folder, enc, path)
    st = tile.stat()
    tile.write_bytes((folder / "b.bmp").read_bytes())  # in place, same size
    os.utime(tile, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime restored, as cp -p does
    assert (tile.stat().st_size, tile.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = GalleryIndex(folder, enc, path)
    assert again.status.startswith("index updated: 1 embedded"), again.status
    assert np.array_equal(again.embeddings[0], first.embeddings[1])  # a.bmp is now b.bmp's picture
    # an index written before inodes and change times were recorded is read, its images embedded again
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        meta["stats"] = [s[:2] for s in meta["stats"]]
        embeddings = data["embeddings"]
    with open(path, "wb") as f:  # np.savez(name) would add .npz to INDEX.NPZ
        np.savez(f, embeddings=embeddings, meta=np.array(json.dumps(meta)))
    assert GalleryIndex(folder, enc, path).status.startswith("index updated: 2 embedded")


def test_unreadable_images_are_not_read_again_until_they_change(exports, tmp_path, monkeypatch):
    folder = tmp_path / "gallery"
    folder.mkdir()
    write_image(folder / "a.png", 16)
    (folder / "broken.png").write_bytes(b"not a png")
    enc, path = OrtEncoder(exports["dynamic"]), tmp_path / "index.npz"
    assert "1 unreadable" in GalleryIndex(folder, enc, path).status
    written = path.stat().st_mtime_ns
    read = []
    monkeypatch.setattr(enc, "preprocess", lambda p: read.append(p) or OrtEncoder.preprocess(enc, p))
    again = GalleryIndex(folder, enc, path)  # retried and the index rewritten on every search before
    assert again.status == "index reused: 1 images unchanged, 1 unreadable (not read again until they change)"
    assert "cannot be read" in again.skipped["broken.png"] and read == [] and path.stat().st_mtime_ns == written
    (folder / "broken.png").unlink()
    assert GalleryIndex(folder, enc, path).status.startswith("index updated: 0 embedded, 1 removed")
    assert GalleryIndex(folder, enc, path).skipped == {}


def test_an_interrupted_indexing_keeps_what_it_embedded(exports, tmp_path, monkeypatch):
    # Ctrl-C while a large folder was embedded lost every embedding made so far: the next search began again
    folder = tmp_path / "gallery"
    folder.mkdir()
    for i in range(70):  # two chunks of the 64 the index embeds at a time
        write_image(folder / f"{i:02d}.png", 8)
    enc, path = OrtEncoder(exports["dynamic"]), tmp_path / "index.npz"
    calls = []

    def interrupted(pixels):
        calls.append(len(pixels))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return OrtEncoder.encode_pixels(enc, pixels)
    monkeypatch.setattr(enc, "encode_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        GalleryIndex(folder, enc, path)
    monkeypatch.undo()
    again = GalleryIndex(folder, enc, path)
    assert again.status == "index updated: 6 embedded, 0 removed, 70 in all", again.status
    assert np.array_equal(again.embeddings, GalleryIndex(folder, enc, tmp_path / "fresh.npz").embeddings)


# what harma-fast depends on that serving must not need (README: OrtEncoder needs onnxruntime, numpy,
# pillow, regex, ftfy — not torch)
NOT_FOR_SERVING = ("torch", "torchvision", "open_clip", "triton", "tqdm", "yaml", "safetensors", "matplotlib",
                   "onnx", "onnxscript", "transformers")


def test_search_and_ort_encoder_run_with_the_serving_packages_alone(exports, tmp_path):
    # `harma-fast search` needed tqdm to build its parser (the `data` command's module imported it),
    # then again for its progress bar: an internal error in a serving install without it
    import subprocess
    import sys
    from pathlib import Path

    folder = tmp_path / "gallery"
    folder.mkdir()
    for i in range(3):
        write_image(folder / f"{i}.png", 16 + i)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    argv = ["search", "--onnx", str(exports["static"]), "--images", str(folder), "a lake", "--top-k", "2",
            "--index", str(tmp_path / "index.npz")]
    script = (f"import sys\nfor name in {NOT_FOR_SERVING!r}:\n    sys.modules[name] = None\n"
              "from harma_fast.export import OrtEncoder\n"
              f"enc = OrtEncoder({str(exports['dynamic'])!r})\n"
              f"print(enc.encode_images([{str(folder / '0.png')!r}]).shape, enc.encode_texts('a lake').shape)\n"
              "from harma_fast.cli import main\n"
              f"code = main({argv!r})\n"
              "assert not [m for m in sys.modules if sys.modules[m] is not None and m.split('.')[0] in "
              f"{NOT_FOR_SERVING!r}]\n"
              "sys.exit(code)")
    root = Path(__file__).resolve().parent.parent  # a checkout runs as installed (harma_fast.export mapped)
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    dim = OrtEncoder(exports["dynamic"]).embed_dim
    assert out.stdout.splitlines()[0] == f"(1, {dim}) (1, {dim})"
    assert len(out.stdout.splitlines()) == 3 and "Traceback" not in out.stderr, out.stdout + out.stderr
    assert "3 embedded, 1 unreadable" in out.stderr and "skipped broken.jpg" in out.stderr
