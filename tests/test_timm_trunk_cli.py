"""open_clip models with a timm image trunk (SigLIP-style ViT, EVA02) through the training and eval CLI."""
import json

import pytest

import family_models
from harma_fast.checkpoints import architecture
from harma_fast.data.synthetic import generate

pytest.importorskip("timm")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_train=24, n_val=6, n_test=6, image_size=40, seed=2)


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    return family_models.register_timm_families(tmp_path_factory.mktemp("configs"))


@pytest.mark.parametrize("name, trunk", [("HarMA-Test-ViT-MAP", "VisionTransformer"), ("HarMA-Test-EVA", "Eva")])
def test_training_through_the_cli_lowers_the_loss_and_evaluates(tmp_path, data, names, name, trunk):
    import harma_fast
    from harma_fast.cli import main

    model = harma_fast.patch(harma_fast.create_model(name))
    # both towers adapted: the timm trunk's blocks, and open_clip's text transformer
    assert type(model.visual.trunk).__name__ == trunk
    assert architecture(model)["image"][:2] == [2, 48] and architecture(model)["text"][:2] == [2, 32]

    out = tmp_path / "run"
    rc = main(["train", "--model", name, "--train-file", str(data["train"]), "--val-file", str(data["val"]),
               "--test-file", str(data["test"]), "--image-root", str(data["image_root"]), "--output-dir", str(out),
               "--epochs", "4", "--batch-size", "16", "--lr", "3e-3", "--num-workers", "0", "--seed", "1",
               "--precision", "fp32"])
    assert rc == 0
    assert {"txt_r1", "img_r1", "r_mean"} <= set(json.loads((out / "result.json").read_text())["test"])

    before, after = family_models.fixed_batch_losses(name, out, data)
    assert after < 0.9 * before, (before, after)

    rc = main(["eval", "--model", name, "--pretrained", str(out / "backbone.pt"), "--adapters",
               str(out / "best.safetensors"), "--test-file", str(data["test"]), "--image-root",
               str(data["image_root"]), "--output", str(tmp_path / "m.json")])
    assert rc == 0 and json.loads((tmp_path / "m.json").read_text())["r_mean"] >= 0


def test_a_siglip_name_without_a_local_tokenizer_is_a_clear_error_not_a_download(tmp_path, names):
    import open_clip

    from harma_fast.errors import ConfigError
    from harma_fast.models import get_tokenizer

    # open_clip picks its SigLipTokenizer by name alone, fetching the vocabulary over http
    cfg = open_clip.get_model_config("HarMA-Test-ViT-MAP")
    (tmp_path / "HarMA-Test-My-SigLIP.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "HarMA-Test-My-SigLIP.json")
    with pytest.raises(ConfigError, match="HarMA-Test-My-SigLIP.*hf_tokenizer_name"):
        get_tokenizer("HarMA-Test-My-SigLIP")
    assert get_tokenizer("HarMA-Test-ViT-MAP")(["a lake"]).shape == (1, 16)  # CLIP's BPE, no download


def test_an_hf_tokenizer_of_an_open_clip_name_comes_from_the_local_cache_only(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from harma_fast.models import get_tokenizer

    asked = []

    def from_pretrained(name, **kwargs):  # stands in for the hub: records how it was asked
        asked.append(kwargs)
        raise OSError(f"{name} is not in the cache")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    with pytest.raises(FileNotFoundError, match="ViT-B-16-SigLIP.*never downloads"):
        get_tokenizer("ViT-B-16-SigLIP")
    assert asked and all(kw.get("local_files_only") for kw in asked)  # HF_HUB_OFFLINE unset would not matter
