"""ONNX export of every family, with its parity check; HF tokenizers served without torch."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import harma_fast
from family_models import FAMILIES, SMALL, hf_folder
from harma_fast.models import get_tokenizer
from helpers import assert_close, randomize_adapters

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CAPTIONS = ["a lake next to a forest", "many red roofs next to the river", "a bridge over the sea",
            "the green farmland and a road"]


def test_hf_folder_exports_with_its_own_tokenizer_served_without_torch(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from harma_fast.export import OrtEncoder, export_onnx

    folder, _ = hf_folder(tmp_path, [{"caption": c} for c in CAPTIONS], context=10)
    model = randomize_adapters(harma_fast.patch(harma_fast.create_model(str(folder)), SMALL), seed=2)
    out = tmp_path / "onnx"
    meta = export_onnx(model, out)  # raises ExportParityError when ONNX Runtime disagrees
    assert meta["text"]["tokenizer"]["type"] == "hf_tokenizers" and (out / "tokenizer.json").is_file()
    assert meta["image"]["mean"] == [0.5, 0.4, 0.3]  # the folder's processor settings
    assert all(row["ok"] for rows in meta["parity"].values() for row in rows)

    queries = [CAPTIONS[0], " ".join(CAPTIONS)]  # the second is cut at the context length
    got = OrtEncoder(out).encode_texts(queries)
    from harma_fast.export.search import truncation_warning  # `harma-fast search` with this export
    assert truncation_warning(OrtEncoder(out), queries[0]) is None
    warning = truncation_warning(OrtEncoder(out), queries[1])  # 10 ids, two of them special
    assert re.search(r"the query is 2\d tokens long but the text encoder reads 8; it was truncated", warning)
    # a tokenizer.json that stores truncation and padding counts the same (they used to hide the overflow)
    from tokenizers import Tokenizer

    from harma_fast.export.families import TokenizersTokenizer
    stored = Tokenizer.from_file(str(out / "tokenizer.json"))
    stored.enable_truncation(max_length=10)
    stored.enable_padding(length=10)
    stored.save(str(tmp_path / "stored.json"))
    plain = OrtEncoder(out).tokenizer
    saving = TokenizersTokenizer(tmp_path / "stored.json", plain.context_length, plain.pad_id)
    for query in queries:
        assert saving.fit(query) == plain.fit(query)
    with torch.no_grad():
        want = model.encode_text(get_tokenizer(str(folder))(queries), normalize=True)
    assert_close(torch.from_numpy(got), want, atol=1e-4, name="text embeddings")

    # the serving tokenizer: the same ids as training's, in a process where torch cannot be imported
    script = ("import sys, json; sys.modules['torch'] = None\n"
              "from pathlib import Path\n"
              "from harma_fast.export.families import load_tokenizer\n"
              f"d = Path({str(out)!r}); spec = json.loads((d / 'harma.json').read_text())['text']['tokenizer']\n"
              f"print(json.dumps(load_tokenizer(d, spec)({queries!r}).tolist()))")
    ids = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    assert np.array_equal(np.array(json.loads(ids)), get_tokenizer(str(folder))(queries).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_exports_and_passes_the_parity_check(tmp_path, name):
    from harma_fast.export import OrtEncoder, export_onnx

    model = randomize_adapters(harma_fast.patch(FAMILIES[name]()[0], SMALL), seed=3)
    meta = export_onnx(model, tmp_path)
    assert set(meta["parity"]) == {"image", "text"}
    assert all(row["ok"] for rows in meta["parity"].values() for row in rows)
    if meta["text"]["tokenizer"] is None:  # no tokenizer ONNX Runtime can serve: said clearly
        with pytest.raises(ValueError, match="tokenize yourself and call encode_tokens"):
            OrtEncoder(tmp_path).encode_texts(["a lake"])
