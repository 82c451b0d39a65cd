"""How a user gets harma_fast: the sdist (what it carries), `python -m harma_fast`, and the
optional dependencies (the [onnx] and [hf] extras) when they are not installed.

The wheel itself was checked by hand (build, non-editable install into a fresh venv, the CLI,
demo, export and search from outside the checkout): see the commit that added this file."""
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from harma_fast.cli import main
from harma_fast.data.synthetic import generate
from harma_fast.errors import HarmaError, MissingDependencyError

ROOT = Path(__file__).resolve().parents[1]


def test_the_sdist_carries_what_its_tests_import(tmp_path):
    # setuptools puts tests/test_*.py into the sdist by itself, but not conftest.py, helpers.py,
    # family_models.py, nor benchmarks/ (which five tests import): its tests could not be collected
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} is older than the build requires (>= 77)")
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", "build", "dist",
                                                             ".pytest_cache", ".benchmarks", "runs", ".whl", "*.onnx"))
    out = subprocess.run([sys.executable, "-c", "from setuptools import build_meta; print(build_meta.build_sdist('out'))"],
                         cwd=src, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # setuptools: "`project.license` as a TOML table is deprecated ... By 2027-Feb-18 ... your builds will no
    # longer be supported"
    assert "deprecated" not in out.stderr, out.stderr[-2000:]
    name = out.stdout.split()[-1]
    with tarfile.open(src / "out" / name) as tar:
        shipped = {Path(*Path(m).parts[1:]).as_posix() for m in tar.getnames()}
    wanted = {p.relative_to(ROOT).as_posix() for folder in ("tests", "benchmarks") for p in (ROOT / folder).iterdir()
              if p.is_file() and p.suffix in (".py", ".md", ".sh", ".png")}  # RESULTS.md shows its .png
    assert wanted - shipped == set()
    assert {"README.md", "pyproject.toml", "MANIFEST.in", "LICENSE"} <= shipped  # MIT asks its notice to travel
    assert not [m for m in shipped if "__pycache__" in m or m.endswith(".pyc")]


def test_python_dash_m_harma_fast_is_the_cli():
    out = subprocess.run([sys.executable, "-m", "harma_fast", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: harma-fast")


# ---- optional packages that are not installed: one line, exit 2, nothing started -----------------
def without(monkeypatch, *names):
    for name in names:  # `import name` now raises ModuleNotFoundError, and find_spec returns None
        monkeypatch.setitem(sys.modules, name, None)


def one_line_error(capsys, argv, command) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "bug" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"harma-fast {command}: error: ")
    return err


def test_export_without_the_onnx_extra_is_one_line(tmp_path, capsys, monkeypatch, no_model):
    # was: the model was built and exported by torch, then `import onnx` failed with a traceback and
    # "internal error ... This is a bug in harma-fast"
    without(monkeypatch, "onnx", "onnxruntime")
    err = one_line_error(capsys, ["export", "--model", "HarMA-Tiny", "--out", str(tmp_path / "onnx")], "export")
    assert "needs onnx and onnxruntime, which are not installed: pip install 'harma-fast[onnx]'" in err
    assert not (tmp_path / "onnx").exists()


def test_search_and_ort_encoder_without_onnxruntime(tmp_path, capsys, monkeypatch):
    without(monkeypatch, "onnxruntime")
    (tmp_path / "images").mkdir()
    err = one_line_error(capsys, ["search", "--onnx", str(tmp_path / "onnx"), "--images", str(tmp_path / "images"),
                                  "a lake", "--index", str(tmp_path / "index.npz")], "search")
    assert "search needs onnxruntime, which is not installed: pip install 'harma-fast[onnx]'" in err
    from harma_fast.export import OrtEncoder

    with pytest.raises(ImportError, match="OrtEncoder needs onnxruntime.*pip install onnxruntime"):
        OrtEncoder(tmp_path / "onnx")


def test_a_hugging_face_export_served_without_tokenizers(tmp_path, monkeypatch):
    pytest.importorskip("tokenizers")
    from harma_fast.export.families import TokenizersTokenizer

    without(monkeypatch, "tokenizers")
    with pytest.raises(MissingDependencyError, match="pip install tokenizers") as info:
        TokenizersTokenizer(tmp_path / "tokenizer.json", 16, 0)
    assert isinstance(info.value, HarmaError)  # `harma-fast search` reports it in one line, not as a bug


def test_a_hugging_face_model_without_transformers_is_one_line(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import family_models

    data = generate(tmp_path / "data", n_train=4, n_val=2, n_test=2, image_size=32, seed=3)
    records = json.loads(data["train"].read_text())
    folder, _ = family_models.hf_folder(tmp_path, records)
    capsys.readouterr()  # save_pretrained's progress bars
    without(monkeypatch, "transformers")
    err = one_line_error(capsys, ["eval", "--test-file", str(data["test"]), "--image-root", str(data["image_root"]),
                                  "--model", str(folder), "--no-progress"], "eval")
    assert "this command needs transformers, which is not installed: pip install 'harma-fast[hf]'" in err


# harma-fast's own dependencies that a serving install (OrtEncoder, `search`) goes without
SERVING_LACKS = ("torch", "torchvision", "open_clip", "triton", "tqdm", "yaml", "safetensors", "matplotlib")


@pytest.mark.parametrize("argv", [["demo", "--output-dir", "{tmp}/demo"],
                                  ["train", "--model", "HarMA-Tiny", "--train-file", "{data}/train.json",
                                   "--image-root", "{data}/images", "--output-dir", "{tmp}/run"],
                                  ["eval", "--model", "HarMA-Tiny", "--test-file", "{data}/test.json",
                                   "--image-root", "{data}/images"]])
def test_training_commands_in_a_serving_install_are_one_line(tmp_path, argv):
    # a serving install has no torch: `train`, `eval` and `demo` died in `import torch`, reported as
    # "internal error ... This is a bug in harma-fast" with a traceback (torch is imported here already,
    # so the command runs in a process where it cannot be)
    data = generate(tmp_path / "data", n_train=4, n_val=0, n_test=2, image_size=32, seed=3)
    argv = [a.format(tmp=tmp_path, data=data["train"].parent) for a in argv]
    script = (f"import sys\nfor name in {SERVING_LACKS!r}:\n    sys.modules[name] = None\n"
              f"from harma_fast.cli import main\nsys.exit(main({argv!r}))")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.startswith(f"harma-fast {argv[0]}: error: this command needs torch, which is not installed") \
        and "pip install torch" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "demo").exists()
