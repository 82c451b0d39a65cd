import copy
import os

import pytest
import torch
from safetensors.torch import save_file

import harma_fast
from harma_fast import HarMAConfig
from harma_fast.checkpoints import adapter_state_dict
from harma_fast.io import atomic_path
from helpers import randomize_adapters, sample_inputs, tiny_model


@pytest.mark.parametrize("config", [HarMAConfig.paper(), HarMAConfig.released(), HarMAConfig(share="none")])
def test_adapter_round_trip_is_exact(tmp_path, config):
    base = tiny_model()
    model = randomize_adapters(harma_fast.patch(copy.deepcopy(base), config), seed=7)
    path = tmp_path / "adapters.safetensors"
    harma_fast.save_adapters(model, path)

    fresh = copy.deepcopy(base)  # unpatched: load_adapters patches it with the file's config
    harma_fast.load_adapters(fresh, path)
    assert fresh.harma_config == config
    saved, loaded = adapter_state_dict(model), adapter_state_dict(fresh)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), fresh.encode_text(tokens))
        assert torch.equal(model.encode_image(images), fresh.encode_image(images))


def test_adapter_file_holds_only_adapters(tmp_path):
    model = harma_fast.patch(harma_fast.create_model("ViT-B-32"), HarMAConfig.released())
    path = tmp_path / "adapters.safetensors"
    harma_fast.save_adapters(model, path)
    size_mb = path.stat().st_size / 2 ** 20
    assert 22 < size_mb < 24  # 5,934,396 float32 values; the 600 MB backbone stays out


def test_load_adapters_config_mismatch_names_the_field(tmp_path):
    path = tmp_path / "a.safetensors"
    harma_fast.save_adapters(harma_fast.patch(tiny_model(), HarMAConfig.released()), path)
    target = harma_fast.patch(tiny_model(), HarMAConfig.paper())
    with pytest.raises(ValueError, match="different HarMAConfig.*share: 'text' vs 'both'"):
        harma_fast.load_adapters(target, path)


def test_load_adapters_architecture_mismatch(tmp_path):
    path = tmp_path / "a.safetensors"
    harma_fast.save_adapters(harma_fast.patch(tiny_model()), path)
    other = harma_fast.create_model("ViT-B-32")
    with pytest.raises(ValueError, match="image tower has 2 blocks of width 96; this model's has 12 blocks of width 768"):
        harma_fast.load_adapters(other, path)
    assert not harma_fast.is_patched(other)


def test_load_adapters_names_the_offending_key(tmp_path):
    model = harma_fast.patch(tiny_model())
    path = tmp_path / "a.safetensors"
    harma_fast.save_adapters(model, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del meta["checksum"]  # a file of this shape written by someone else: the checksum test is elsewhere
    key = "transformer.resblocks.1.harma.up.weight"
    tensors[key] = torch.zeros(3, 3)
    save_file(tensors, str(path), metadata=meta)
    fresh = tiny_model()
    with pytest.raises(ValueError, match=rf"{key} has shape \(3, 3\) in the file, \(64, 128\) in the model"):
        harma_fast.load_adapters(fresh, path)
    assert not harma_fast.is_patched(fresh)
    del tensors[key]
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match=rf"1 missing \(e\.g\. {key}\)"):
        harma_fast.load_adapters(fresh, path)


def test_load_adapters_bad_files(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="adapter file .*nope.safetensors does not exist"):
        harma_fast.load_adapters(model, tmp_path / "nope.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"garbage" * 20)
    with pytest.raises(ValueError, match="cannot read adapter file .*corrupt.safetensors: not a valid safetensors"):
        harma_fast.load_adapters(model, corrupt)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a harma_fast adapter file"):
        harma_fast.load_adapters(model, foreign)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "a.safetensors"
    model = randomize_adapters(harma_fast.patch(tiny_model()))
    harma_fast.save_adapters(model, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("disk full")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temp file left behind


def test_save_to_unwritable_directory_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    with pytest.raises(PermissionError, match="not writable"):
        harma_fast.save_adapters(harma_fast.patch(tiny_model()), locked / "a.safetensors")


def test_save_adapters_of_unpatched_model():
    with pytest.raises(RuntimeError, match="not patched"):
        harma_fast.save_adapters(tiny_model(), "x.safetensors")
