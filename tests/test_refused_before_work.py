"""search and export refuse what they can know is wrong before the work it would waste: a
gallery embedded and indexed for an export without a text tower, an index name search would
later refuse to read, an evaluation file read only after minutes of export and quantization."""
import pytest

from harma_fast.cli import main
from harma_fast.data.synthetic import generate
from helpers import tiny_model

pytest.importorskip("onnxruntime")
from harma_fast.export import export_onnx  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_train=4, n_val=4, n_test=4, image_size=32, seed=2)


@pytest.fixture(scope="module")
def image_only(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(tiny_model(), out, towers=("image",), model_name="HarMA-Tiny", check=False)
    return out


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(tiny_model(), out, model_name="HarMA-Tiny", check=False)
    return out


def test_search_with_an_export_without_text_tower_embeds_nothing(data, image_only, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARMA_FAST_CACHE", str(tmp_path / "cache"))
    assert main(["search", "a lake", "--onnx", str(image_only), "--images", str(data["image_root"])]) == 2
    assert "the text tower was not exported" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists()  # no index was written


def test_an_index_name_search_cannot_read_back_is_refused_before_it_is_written(data, both, tmp_path, capsys):
    index = tmp_path / "gallery.idx"
    assert main(["search", "a lake", "--onnx", str(both), "--images", str(data["image_root"]),
                 "--index", str(index)]) == 2
    assert "is not a .npz file name" in capsys.readouterr().err and not index.exists()


def test_an_int8_check_file_is_read_before_the_export(data, tmp_path):
    from harma_fast.data.annotations import AnnotationError

    said = []
    with pytest.raises(AnnotationError, match="training file"):  # the training file, given by mistake
        export_onnx(tiny_model(), tmp_path / "onnx", dtype="int8", model_name="HarMA-Tiny",
                    check_file=str(data["train"]), image_root=str(data["image_root"]), progress=said.append)
    assert said == [] and not (tmp_path / "onnx").exists()
