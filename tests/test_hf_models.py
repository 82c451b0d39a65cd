"""Local Hugging Face folders: create_model, tokenizer, preprocessing, training through the CLI."""
import json
import re

import pytest
import torch

import harma_fast
import harma_fast.cli
import family_models
from family_models import MEAN, STD
from harma_fast.checkpoints import architecture
from harma_fast.data.synthetic import generate
from harma_fast.data.transforms import model_image_spec
from harma_fast.errors import ConfigError
from harma_fast.models import get_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_train=24, n_val=6, n_test=6, image_size=40, seed=2)


def hf_folder(tmp_path, data, kind="clip", context=16):
    records = json.loads(data["train"].read_text()) + json.loads(data["test"].read_text())
    return family_models.hf_folder(tmp_path, records, kind, context)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_create_model_from_a_local_folder_has_the_encode_api(tmp_path, data, kind):
    folder, original = hf_folder(tmp_path, data, kind)
    model = harma_fast.create_model(str(folder))
    assert type(model).__name__ == type(original).__name__
    assert model_image_spec(model) == (32, MEAN, STD)
    assert model.context_length == 16 and model.harma_model_name == str(folder)
    images = torch.randn(2, 3, 32, 32)
    tokens = get_tokenizer(str(folder))(["a lake", "many red roofs"])
    with torch.no_grad():
        img = model.encode_image(images, normalize=True)
        want = original.eval().get_image_features(pixel_values=images).pooler_output
        assert torch.allclose(img, torch.nn.functional.normalize(want, dim=-1), atol=1e-6)
        out = model(images, tokens)
        assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2))
        # the model's own forward stays reachable with its keyword arguments
        assert model(input_ids=tokens, pixel_values=images).logits_per_image.shape == (2, 2)
    harma_fast.patch(model)
    assert architecture(model) == {"image": [2, 48, "hf"], "text": [2, 32, "hf"]}


def test_tokenizer_is_the_folders_own_padded_to_the_context(tmp_path, data):
    folder, _ = hf_folder(tmp_path, data, context=8)
    tok = get_tokenizer(str(folder))
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    short = tok(["The lake"])[0]
    ids = raw.encode("The lake").ids
    assert short[:len(ids)].tolist() == ids and ids[-1] == 3 and short[len(ids):].eq(0).all()
    long = tok([" ".join(["lake"] * 20)])[0]
    assert long.shape == (8,) and long[-1] == 3 and long[0] == 2  # cut, keeping the end-of-text token


def test_folder_without_weights_is_a_clear_error_not_a_download(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(transformers.CLIPConfig().to_dict()))
    with pytest.raises(ValueError, match=f"cannot load a Hugging Face model from {folder}"):
        harma_fast.create_model(str(folder))


def test_training_through_the_cli_lowers_the_loss_and_evaluates(tmp_path, data):
    from harma_fast.cli import main

    folder, _ = hf_folder(tmp_path, data)
    out = tmp_path / "run"
    rc = main(["train", "--model", str(folder), "--train-file", str(data["train"]), "--val-file", str(data["val"]),
               "--test-file", str(data["test"]), "--image-root", str(data["image_root"]), "--output-dir", str(out),
               "--epochs", "4", "--batch-size", "16", "--lr", "3e-3", "--num-workers", "0", "--seed", "1",
               "--precision", "fp32"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert {"txt_r1", "img_r1", "r_mean"} <= set(result["test"])

    # one fixed batch of training pairs: the loss of the trained adapters is below the untrained one's
    before, after = family_models.fixed_batch_losses(str(folder), out, data)
    assert after < 0.9 * before, (before, after)

    # evaluation through the CLI with the folder's tokenizer and processor settings
    rc = main(["eval", "--model", str(folder), "--pretrained", str(out / "backbone.pt"), "--adapters",
               str(out / "best.safetensors"), "--test-file", str(data["test"]), "--image-root",
               str(data["image_root"]), "--output", str(tmp_path / "m.json")])
    assert rc == 0 and json.loads((tmp_path / "m.json").read_text())["r_mean"] >= 0


@pytest.mark.parametrize("name, text, message", [
    ("preprocessor_config.json", "{not json", r"cannot read .*preprocessor_config\.json: Expecting property name"),
    ("tokenizer_config.json", "{not json", r"cannot read .*tokenizer_config\.json: Expecting property name"),
    ("preprocessor_config.json", "[1, 2]", r"preprocessor_config\.json holds a JSON list, not an object"),
    ("preprocessor_config.json", '{"image_mean": [0.5, 0.5]}', r"'image_mean' is \[0\.5, 0\.5\]; it must be three numbers"),
    ("preprocessor_config.json", '{"image_std": 5}', None),  # one number for every channel, as HF allows
    ("preprocessor_config.json", '{"size": {"height": "224"}}', r"image size .* is '224'; it must be a positive whole"),
    # tokenizers' bare Exception for a file it cannot parse
    ("tokenizer.json", "{not json", r"cannot read .*tokenizer\.json: key must be a string .* it is damaged"),
    ("tokenizer.json", '{"version": "1.0"}', r"cannot read .*tokenizer\.json: .* it is damaged"),
    # "unknown open_clip model '<folder>'" and safetensors' SafetensorError ("a bug in harma-fast")
    ("config.json", "{not json", r"is a folder but no Hugging Face model folder: its config\.json cannot be read"),
    ("model.safetensors", "cut short", r"cannot load a Hugging Face model from .*tiny-clip: "),
])
def test_a_damaged_folder_file_is_one_line_not_a_bug(tmp_path, data, capsys, name, text, message):
    # json's JSONDecodeError and "TypeError: 'int' object is not iterable" ended in "This is a bug in harma-fast"
    folder, _ = hf_folder(tmp_path, data)
    (folder / name).write_text(text)
    capsys.readouterr()
    status = harma_fast.cli.main(["eval", "--test-file", str(data["test"]), "--image-root", str(data["image_root"]),
                                  "--model", str(folder), "--no-progress"])
    err = capsys.readouterr().err
    if message is None:
        assert status == 0, err
        return
    assert status == 2 and "Traceback" not in err, err
    assert re.search(message, err.strip().splitlines()[-1]), err


@pytest.mark.parametrize("stored", [{"padding": 32}, {"truncation": 4}])
def test_tokenizer_json_with_its_own_padding_or_truncation_tokenizes_as_the_processor(tmp_path, data, stored):
    """A tokenizer.json may store a padding length or max_length other than the model's context
    (the processor overrides both): a stored length above the context used to leave a pad where
    the end-of-text id belongs, one below it cut texts short, in training and serving alike."""
    from harma_fast.export.families import TokenizersTokenizer

    folder, _ = hf_folder(tmp_path, data, context=8)
    texts = [" ".join(["lake"] * 20), "The lake"]
    want = get_tokenizer(str(folder))(texts)
    raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    if "padding" in stored:
        raw.enable_padding(length=stored["padding"], pad_id=0, pad_token="<pad>")
    else:
        raw.enable_truncation(max_length=stored["truncation"])
    raw.save(str(folder / "tokenizer.json"))
    got = get_tokenizer(str(folder))(texts)
    assert got.tolist() == want.tolist() and got[0, -1] == 3
    serving = TokenizersTokenizer(folder / "tokenizer.json", 8, 0)(texts)  # what OrtEncoder serves
    assert serving.tolist() == want.tolist()


@pytest.mark.parametrize("kind", ["Siglip2", "ChineseCLIP"])
def test_a_dual_encoder_of_another_architecture_is_refused_by_name(tmp_path, kind):
    """Siglip2Model crashed deep in training ("no attribute 'visual'"); ChineseCLIPModel trained
    its image tower only, its BERT text tower run without the attention mask it needs."""
    model_cls, config_cls = getattr(transformers, f"{kind}Model"), getattr(transformers, f"{kind}Config")
    if kind == "Siglip2":
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_patches=16,
                      patch_size=8)
    else:
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)
    text = dict(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=8)
    model_cls(config_cls(text_config=text, vision_config=vision)).save_pretrained(str(tmp_path / kind))
    with pytest.raises(ConfigError, match=rf"{kind}Model \(model_type .*\) is not a Hugging Face model harma_fast "
                                          r"supports: CLIPModel and SiglipModel"):
        harma_fast.create_model(str(tmp_path / kind))


@pytest.mark.parametrize("where", ["special_tokens_map.json", "tokenizer.json"])
def test_pad_token_outside_tokenizer_config_is_the_one_padded_with(tmp_path, data, where):
    """A folder whose tokenizer_config.json names no pad token keeps it in special_tokens_map.json
    (older save_pretrained) or in tokenizer.json's padding: it was padded with id 0 instead."""
    folder, _ = hf_folder(tmp_path, data, context=8)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8}))
    if where == "special_tokens_map.json":
        (folder / where).write_text(json.dumps({"pad_token": {"content": "<eos>", "lstrip": False}}))
    else:
        raw = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        raw.enable_padding(pad_id=3, pad_token="<eos>")
        raw.save(str(folder / "tokenizer.json"))
    tok = get_tokenizer(str(folder))
    assert tok.pad_id == 3 and tok(["The lake"])[0, -3:].tolist() == [3, 3, 3]


@pytest.mark.parametrize("kind, mean", [("siglip", (0.5, 0.5, 0.5)), ("clip", (0.48145466, 0.4578275, 0.40821073))])
def test_a_folder_without_preprocessor_config_normalises_as_its_image_processor(tmp_path, data, kind, mean):
    """SigLIP's image processor defaults to mean = std = 0.5; such a folder was fed CLIP's statistics."""
    folder, _ = hf_folder(tmp_path, data, kind=kind)
    (folder / "preprocessor_config.json").unlink()
    size, got_mean, got_std = model_image_spec(harma_fast.create_model(str(folder)))
    assert size == 32 and got_mean == mean and (got_std == (0.5, 0.5, 0.5)) == (kind == "siglip")
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_std": [0.2, 0.2, 0.2]}))  # one field given
    assert model_image_spec(harma_fast.create_model(str(folder)))[1:] == (mean, (0.2, 0.2, 0.2))
