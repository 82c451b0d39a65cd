"""Served queries are cleaned as training cleaned its captions (lower-case, no punctuation): a
comma or full stop is a token the adapters never saw, and moved a query's hits (export/runtime.py)."""
import numpy as np
import pytest

from helpers import tiny_model

pytest.importorskip("onnxruntime")
from harma_fast.export import OrtEncoder, export_onnx  # noqa: E402
from harma_fast.export.search import truncation_warning  # noqa: E402


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(tiny_model(), out, model_name="HarMA-Tiny", check=False)
    return OrtEncoder(out)


def test_a_query_is_embedded_as_its_cleaned_caption(encoder):
    from harma_fast.data.layouts import clean_caption

    raw = "A Lake, with two BOATS; near the shore."
    served = encoder.encode_texts([raw])
    assert np.array_equal(served, encoder.encode_texts([clean_caption(raw)]))
    assert np.array_equal(served, encoder.encode_texts(raw))
    # as given, the punctuation is tokenized: another embedding
    assert not np.allclose(served, encoder.encode_texts([raw], clean=False))


def test_punctuation_does_not_count_towards_the_truncation_warning(encoder):
    room = encoder.tokenizer.fit("a")[1]
    words = ["roof"] * (room - 2)
    assert truncation_warning(encoder, ", ".join(words) + ".") is None  # fits once cleaned
    assert truncation_warning(encoder, " ".join(words * 2)) is not None
