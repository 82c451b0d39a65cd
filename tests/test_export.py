import copy
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import harma_fast
from harma_fast.cli import main
from harma_fast.errors import ConfigError, OutputPathError
from helpers import randomize_adapters, tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from harma_fast.export import BPETokenizer, ExportParityError, OrtEncoder, export_onnx  # noqa: E402


def torch_embeddings(model, pixels=None, tokens=None):
    ref = harma_fast.set_backend(copy.deepcopy(model), "reference") if harma_fast.is_patched(model) else model
    with torch.no_grad():
        if pixels is not None:
            return ref.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
        return ref.encode_text(torch.from_numpy(tokens), normalize=True).numpy()


def assert_parity(encoder, model, max_abs, min_cos, seed=0):
    rng = np.random.default_rng(seed)
    size = encoder.meta["image"]["size"]
    captions = ["a lake", "many red roofs next to a wide river crossing the green farmland " * 6]
    for batch in (1, 7):
        pixels = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        pairs = [(encoder.encode_pixels(pixels), torch_embeddings(model, pixels=pixels))]
        for text in captions:  # short and long (truncated at the context length)
            tokens = encoder.tokenizer([text] * batch)
            pairs.append((encoder.encode_tokens(tokens), torch_embeddings(model, tokens=tokens)))
        for got, want in pairs:
            assert got.shape == want.shape
            # unit length in every dtype: fp16 graphs normalised in fp16 were off by up to 5e-4
            norm_error = np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - 1).max()
            assert norm_error <= 1e-5, f"embeddings' norms differ from 1 by up to {norm_error:.1e}"
            assert np.abs(got - want).max() <= max_abs
            cos = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
            assert cos.min() >= min_cos


def only_standard_ops(path):
    model = onnx.load(str(path))
    domains = {n.domain for n in model.graph.node}
    return domains <= {"", "ai.onnx"} and not model.functions, domains


@pytest.mark.parametrize("patched, fused", [(True, True), (True, False), (False, True)])
def test_tiny_model_exports_and_matches_pytorch(tmp_path, patched, fused):
    model = tiny_model()
    if patched:
        randomize_adapters(harma_fast.patch(model), seed=2)
    meta = export_onnx(model, tmp_path, model_name="HarMA-Tiny", fused=fused)
    assert meta["harma_config"] is not None if patched else meta["harma_config"] is None
    encoder = OrtEncoder(tmp_path)
    assert_parity(encoder, model, max_abs=1e-4, min_cos=0.99999)
    for tower in ("image", "text"):
        ok, domains = only_standard_ops(tmp_path / f"{tower}.onnx")
        assert ok != fused, f"{tower}.onnx uses domains {domains}"
    assert all(r["ok"] for rows in meta["parity"].values() for r in rows)
    if patched:
        assert harma_fast.is_patched(model) and model.transformer.resblocks[0].harma.backend == "auto"  # untouched


@pytest.mark.slow
def test_patched_vit_b32_exports_and_matches_pytorch(tmp_path):
    torch.manual_seed(0)
    model = randomize_adapters(harma_fast.patch(harma_fast.create_model("ViT-B-32")), seed=4, scale=0.1)
    export_onnx(model, tmp_path, progress=print)
    assert_parity(OrtEncoder(tmp_path), model, max_abs=1e-4, min_cos=0.99999)


def test_fp16_export_within_its_documented_tolerance(tmp_path):
    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=2)
    meta = export_onnx(model, tmp_path, dtype="fp16", model_name="HarMA-Tiny")
    assert meta["dtype"] == "fp16"
    assert_parity(OrtEncoder(tmp_path), model, max_abs=2e-2, min_cos=0.999)


def test_tokenizer_matches_open_clip(tmp_path):
    import open_clip
    from harma_fast.export.onnx_export import _vocab_path
    reference = open_clip.get_tokenizer("ViT-B-32")
    ours = BPETokenizer(str(_vocab_path()), 77)
    texts = ["A lake at the top-left, with MANY red roofs!!", "café déjà vu &amp; naïve — 東京 123", "",
             "x" * 300, " ".join(["storage tanks"] * 60), "it's the <start_of_text> token", "😀 emoji"]
    assert np.array_equal(ours(texts), reference(texts).numpy())


def test_failed_export_writes_nothing_and_keeps_the_earlier_export(tmp_path, monkeypatch):
    import harma_fast.export.onnx_export as ox
    model = tiny_model()
    earlier = export_onnx(model, tmp_path, towers=("text",), model_name="HarMA-Tiny")
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir()}

    def broken(model, out_dir, **kw):
        return {"image": [{"batch": 1, "max_abs": 0.5, "min_cosine": 0.2, "ok": False}]}
    monkeypatch.setattr(ox, "check_parity", broken)
    with pytest.raises(ExportParityError, match="image tower at batch 1: max abs 5.00e-01.*No file was written to "
                       ".*an earlier export there is kept"):
        export_onnx(model, tmp_path, towers=("image",), model_name="HarMA-Tiny")
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == before  # no scratch folder left either
    assert json.loads((tmp_path / "harma.json").read_text())["export_id"] == earlier["export_id"]
    fresh = tmp_path / "new"
    with pytest.raises(ExportParityError):
        export_onnx(model, fresh, towers=("image",), model_name="HarMA-Tiny")
    assert not fresh.exists()  # the folder it made is gone too


def test_a_successful_export_replaces_the_earlier_one_whole(tmp_path):
    model = tiny_model()
    export_onnx(model, tmp_path, towers=("text",), model_name="HarMA-Tiny")
    meta = export_onnx(model, tmp_path, towers=("image",), model_name="HarMA-Tiny")
    names = {f.name for f in tmp_path.iterdir()}
    assert {"harma.json", "image.onnx"} <= names and "text.onnx" not in names  # no stale text graph
    assert OrtEncoder(tmp_path).meta["export_id"] == meta["export_id"]


def test_an_image_only_export_between_two_text_exports_does_not_block_the_second(tmp_path):
    # the image-only export left the text export's tokenizer file behind, listed by no harma.json:
    # the next text export refused the folder ("holds bpe_simple_vocab_16e6.txt.gz, not from a
    # harma_fast export"), for a file harma_fast itself had written there
    model = tiny_model()
    export_onnx(model, tmp_path, towers=("text",), model_name="HarMA-Tiny", check=False)
    export_onnx(model, tmp_path, towers=("image",), model_name="HarMA-Tiny", check=False)
    assert {f.name for f in tmp_path.iterdir()} == {"harma.json", "image.onnx"}
    meta = export_onnx(model, tmp_path, model_name="HarMA-Tiny", check=False)
    assert OrtEncoder(tmp_path).encode_texts("a lake").shape == (1, meta["embed_dim"])


def test_scratch_folders_of_killed_exports_are_cleaned_up(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".export-{int(dead.stdout)}-abc"   # its process has exited
    alive = tmp_path / f".export-{os.getpid()}-def"           # an export still running (this process)
    for stage in (abandoned, alive):
        stage.mkdir()
        (stage / "image.onnx").write_bytes(b"partial")
    export_onnx(tiny_model(), tmp_path, towers=("text",), model_name="HarMA-Tiny", check=False)
    assert not abandoned.exists() and alive.exists()


@pytest.mark.parametrize("opset", [5, 17, 99, True])
def test_an_opset_the_exporter_cannot_write_is_refused(tmp_path, opset):
    # torch.onnx builds opset 18 and converts upwards only: 5 used to give an opset-18 graph silently,
    # 99 a converter traceback and then an "invalid graph" error
    with pytest.raises(ConfigError, match="opset must be an integer from 18 to"):
        export_onnx(tiny_model(), tmp_path / "x", towers=("text",), opset=opset, model_name="HarMA-Tiny")
    assert not (tmp_path / "x").exists()


def test_runtime_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no harma.json"):
        OrtEncoder(tmp_path)
    export_onnx(tiny_model(), tmp_path, towers=("image",), model_name="HarMA-Tiny")
    encoder = OrtEncoder(tmp_path)
    with pytest.raises(ValueError, match="the text tower was not exported to .*holds: image"):
        encoder.encode_texts(["a lake"])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="image .*bad.jpg cannot be read"):
        encoder.encode_images([bad])
    with pytest.raises(FileNotFoundError, match="image .*nope.png does not exist"):
        encoder.encode_images([tmp_path / "nope.png"])
    meta = json.loads((tmp_path / "harma.json").read_text())
    meta["format"] = "someone-else/2"
    (tmp_path / "harma.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="has format 'someone-else/2'; this harma_fast reads"):
        OrtEncoder(tmp_path)
    (tmp_path / "harma.json").write_text("{not json")
    with pytest.raises(ValueError, match="harma.json is not valid JSON"):
        OrtEncoder(tmp_path)


@pytest.mark.parametrize("static_batch", [None, 4])
def test_encoder_refuses_malformed_pixels_and_tokens_clearly(tmp_path, static_batch):
    export_onnx(tiny_model(), tmp_path, model_name="HarMA-Tiny", batch_size=static_batch, check=False)
    enc = OrtEncoder(tmp_path)
    size, length = enc.meta["image"]["size"], enc.meta["text"]["context_length"]
    for shape in ((2, 3, size + 1, size), (3, size, size), (2, 1, size, size)):
        with pytest.raises(ValueError, match=rf"pixels must have shape \(N, 3, {size}, {size}\) .*got {re.escape(str(shape))}"):
            enc.encode_pixels(np.zeros(shape, np.float32))
    pixels = np.zeros((5, 3, size, size), np.float32)
    pixels[3, 1, 2, 2] = np.nan  # would silently give one NaN embedding
    with pytest.raises(ValueError, match=r"pixels of image\(s\) \[3\] of the batch are NaN or infinite"):
        enc.encode_pixels(pixels)
    for tokens in (np.zeros((2, length + 1), np.int64), np.zeros((2, length)), np.zeros(length, np.int64)):
        with pytest.raises(ValueError, match=rf"tokens must be integer ids of shape \(N, {length}\)"):
            enc.encode_tokens(tokens)
    for bad_id in (-1, 49408):
        tokens = np.zeros((2, length), np.int64)
        tokens[1, 3] = bad_id
        with pytest.raises(ValueError, match="this export's vocabulary has ids 0 to 49407"):
            enc.encode_tokens(tokens)
    assert enc.encode_pixels(np.zeros((0, 3, size, size), np.float32)).shape == (0, enc.embed_dim)


@pytest.mark.slow
def test_search_finds_the_captioned_image_after_demo_training(trained_demo, tmp_path, capsys):
    from harma_fast.data.annotations import load_eval_records
    from harma_fast.export import GalleryIndex
    root = tmp_path / "gallery"
    run = f"{trained_demo['output_dir']}/run"
    data = f"{trained_demo['output_dir']}/data"
    assert main(["export", "--model", "HarMA-Tiny", "--pretrained", f"{run}/backbone.pt",
                 "--adapters", f"{run}/best.safetensors", "--out", str(tmp_path / "onnx")]) == 0
    records = load_eval_records(f"{data}/test.json", f"{data}/images")
    root.mkdir()
    queries = {}
    for i, image in enumerate(records.images[:20]):
        shutil.copy(image, root / image.name)
        queries[image.name] = records.captions[records.text_to_image.index(i)]  # its full description
    encoder = OrtEncoder(tmp_path / "onnx")
    index = GalleryIndex(root, encoder, tmp_path / "index.npz")
    hits = [name in {h.path.name for h in index.search(q, 5)} for name, q in queries.items()]
    # random scores put the image in the top 5 of 20 a quarter of the time; measured 20/20 (torch 2.14.1, 2.9.1)
    assert sum(hits) / len(hits) >= 0.5, f"top-5 hit rate {sum(hits)}/{len(hits)}"

    capsys.readouterr()  # drop the export's output
    args = ["search", "a lake on farmland", "--onnx", str(tmp_path / "onnx"), "--images", str(root),
            "--top-k", "3", "--index", str(tmp_path / "index.npz"), "--html", str(tmp_path / "page.html")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "index reused: 20 images unchanged" in captured.err
    assert len([line for line in captured.out.splitlines() if line.strip()]) == 3
    page = (tmp_path / "page.html").read_text()
    assert "a lake on farmland" in page and page.count("<img ") == 3
    (root / "broken.png").write_bytes(b"not a png")
    shutil.copy(records.images[25], root / "new.tif")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "index updated: 1 embedded, 1 unreadable, 0 removed, 21 in all" in err and "skipped broken.png" in err


def test_export_in_a_serving_install_without_torch_is_one_line(tmp_path, capsys, monkeypatch, no_model):
    # OrtEncoder and search need no torch (README); `export` there died in `import torch`, reported as
    # "internal error ... This is a bug in harma-fast" with a traceback
    for name in ("torch", "open_clip"):  # `import` raises ModuleNotFoundError, find_spec returns None
        monkeypatch.setitem(sys.modules, name, None)
    assert main(["export", "--model", "HarMA-Tiny", "--out", str(tmp_path / "onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("harma-fast export: error: export needs torch, open_clip_torch, not installed here") \
        and "pip install 'harma-fast[onnx]'" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "onnx").exists()


def test_export_never_deletes_files_that_are_not_from_a_harma_fast_export(tmp_path, capsys, monkeypatch):
    # an image-only export deleted a user's own text.onnx, text.onnx.data and harma.json in --out
    mine = {"text.onnx": b"my graph", "text.onnx.data": b"my weights", "harma.json": b'{"mine": 1}'}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(OutputPathError, match="holds harma.json, text.onnx"):
        export_onnx(tiny_model(), tmp_path, towers=("image",), model_name="HarMA-Tiny", check=False)
    monkeypatch.setattr(harma_fast, "create_model", lambda *a, **k: pytest.fail("the model was built first"))
    assert main(["export", "--model", "HarMA-Tiny", "--towers", "image", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path} holds harma.json, text.onnx, text.onnx.data, not from a harma_fast export" in err
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir()} == mine
