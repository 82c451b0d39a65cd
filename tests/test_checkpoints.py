import copy
import json
import os
import random
import struct

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
    torch_file = tmp_path / "last.pt"  # a training checkpoint given where adapters are expected
    torch.save({"adapters": {"w": torch.zeros(2)}}, torch_file)
    with pytest.raises(ValueError, match="last.pt is a PyTorch checkpoint, not a safetensors adapter file: .*--checkpoint"):
        harma_fast.load_adapters(model, torch_file)
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


# --------------------------------------------------------------------------------------------
# which backbone adapters belong to
# --------------------------------------------------------------------------------------------
def test_backbone_fingerprint_follows_the_weights_not_their_dtype_or_patching():
    from harma_fast.checkpoints import backbone_fingerprint

    model = tiny_model(seed=0)
    fingerprint = backbone_fingerprint(model)
    assert backbone_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) == fingerprint
    patched = harma_fast.patch(copy.deepcopy(model))
    assert backbone_fingerprint(randomize_adapters(patched)) == fingerprint  # adapters are not the backbone
    assert backbone_fingerprint(tiny_model(seed=1)) != fingerprint  # another random initialisation
    tuned = copy.deepcopy(model)
    with torch.no_grad():  # a fine-tuned backbone: one tensor moved by 0.5%
        tuned.transformer.resblocks[1].mlp.c_fc.weight.mul_(1.005)
    assert backbone_fingerprint(tuned) != fingerprint


def test_adapters_refuse_another_backbone_naming_what_to_pass(tmp_path):
    from harma_fast.errors import CheckpointError

    trained_on = tiny_model(seed=0)
    path = tmp_path / "best.safetensors"
    harma_fast.save_adapters(randomize_adapters(harma_fast.patch(copy.deepcopy(trained_on))), path)
    (tmp_path / "backbone.pt").write_bytes(b"")  # the run directory's saved backbone
    other = tiny_model(seed=1)
    with pytest.raises(CheckpointError, match=rf"adapter file {path} was trained on another backbone.*"
                                              rf"--pretrained {tmp_path / 'backbone.pt'}.*--ignore-backbone-mismatch"):
        harma_fast.load_adapters(other, path)
    assert not harma_fast.is_patched(other)
    harma_fast.load_adapters(other, path, check_backbone=False)  # the explicit opt-out
    harma_fast.load_adapters(copy.deepcopy(trained_on), path)
    # a file that says where its backbone came from quotes it
    harma_fast.save_adapters(harma_fast.patch(copy.deepcopy(trained_on)), path, backbone="RS5M_ViT-B-32_RET-2.pt")
    with pytest.raises(CheckpointError, match="--pretrained RS5M_ViT-B-32_RET-2.pt"):
        harma_fast.load_adapters(tiny_model(seed=1), path)


def test_a_float16_model_is_not_called_another_backbone(tmp_path):
    # create_model(..., precision="fp16") or model.half() on the very backbone the adapters were trained on
    # was refused as "trained on another backbone ... pass the --pretrained weights it was trained with"
    from harma_fast.errors import CheckpointError

    base = tiny_model(seed=0)
    path, half_path = tmp_path / "fp32.safetensors", tmp_path / "fp16.safetensors"
    trained = randomize_adapters(harma_fast.patch(copy.deepcopy(base)))
    harma_fast.save_adapters(trained, path)
    harma_fast.save_adapters(copy.deepcopy(trained).half(), half_path)
    half = copy.deepcopy(base).half()
    with pytest.raises(CheckpointError, match="saved from a float32 .*model and this model's backbone is float16") as info:
        harma_fast.load_adapters(half, path)
    assert "another backbone" not in str(info.value) and not harma_fast.is_patched(half)
    with pytest.raises(CheckpointError, match="saved from a float16 model and this model's backbone is float32"):
        harma_fast.load_adapters(copy.deepcopy(base), half_path)
    # what the messages say to do works, and really another backbone is still called that
    harma_fast.load_adapters(half, half_path)
    harma_fast.load_adapters(copy.deepcopy(base), path)
    with pytest.raises(CheckpointError, match="was trained on another backbone"):
        harma_fast.load_adapters(tiny_model(seed=1).half(), half_path)


def test_adapter_file_without_fingerprint_loads_with_a_warning(tmp_path):
    from safetensors import safe_open

    path = tmp_path / "old.safetensors"
    harma_fast.save_adapters(harma_fast.patch(tiny_model()), path)
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    for key in ("backbone_fingerprint", "checksum"):  # as written before these existed
        del meta[key]
    save_file(tensors, str(path), metadata=meta)
    with pytest.warns(UserWarning, match="records no backbone fingerprint"):
        harma_fast.load_adapters(tiny_model(seed=3), path)


def test_eval_of_a_demo_run_without_its_backbone_is_refused(tmp_path, capsys):
    """`harma-fast eval` without --pretrained backbone.pt used to score the adapters on a fresh random
    backbone and print a wrong mR with no warning."""
    from harma_fast.cli import main

    assert main(["demo", "--output-dir", str(tmp_path), "--steps", "1", "--seed", "3"]) == 0
    run, data = tmp_path / "run", tmp_path / "data"
    evaluate = ["eval", "--test-file", str(data / "test.json"), "--image-root", str(data / "images"),
                "--model", "HarMA-Tiny", "--adapters", str(run / "best.safetensors")]
    capsys.readouterr()
    assert main(evaluate + ["--output", str(tmp_path / "wrong.json")]) != 0
    err = capsys.readouterr().err
    assert "trained on another backbone" in err and f"--pretrained {run / 'backbone.pt'}" in err
    assert not (tmp_path / "wrong.json").exists()
    assert main(evaluate + ["--pretrained", str(run / "backbone.pt"), "--output", str(tmp_path / "m.json")]) == 0
    test = json.loads((run / "result.json").read_text())["test"]
    assert json.loads((tmp_path / "m.json").read_text())["r_mean"] == pytest.approx(test["r_mean"], abs=1e-9)
    assert main(evaluate + ["--ignore-backbone-mismatch"]) == 0


# --------------------------------------------------------------------------------------------
# unreadable checkpoints: one clear error each
# --------------------------------------------------------------------------------------------
def _training_checkpoint(path, model):
    from harma_fast.trainstate import Position, save_training_state

    loss = harma_fast.HarMALoss()
    params = list(adapter_state_dict(model).values())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_training_state(path, model, "HarMA-Tiny", loss, optimizer, scheduler, Position(step=7), {"seed": 1})
    return loss


def _flip_bit_of(path, value: float, bit: int = 30):
    """Flip one bit of the float32 ``value`` where it is stored in ``path`` (it must occur once)."""
    data = bytearray(path.read_bytes())
    needle = struct.pack("<f", value)
    assert data.count(needle) == 1, "the value must be unique in the file to flip it"
    at = data.index(needle)
    word = struct.unpack("<I", bytes(data[at:at + 4]))[0] ^ (1 << bit)
    data[at:at + 4] = struct.pack("<I", word)
    path.write_bytes(bytes(data))
    return struct.unpack("<f", struct.pack("<I", word))[0]


def test_unreadable_training_checkpoints_get_one_clear_error(tmp_path):
    from harma_fast.errors import CheckpointError
    from harma_fast.trainstate import load_training_state

    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=3)
    path = tmp_path / "last.pt"
    loss = _training_checkpoint(path, model)
    assert load_training_state(path, model, "HarMA-Tiny", loss).step == 7
    good = path.read_bytes()

    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is empty \(0 bytes\).*--overwrite"):
        load_training_state(path, model, "HarMA-Tiny", loss)
    path.write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is not a PyTorch checkpoint") as err:
        load_training_state(path, model, "HarMA-Tiny", loss)
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle untrusted code is not passed on
    path.write_bytes(good[: len(good) // 2])  # a copy cut short
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is"):
        load_training_state(path, model, "HarMA-Tiny", loss)
    # an adapter file given where a checkpoint goes (eval --checkpoint best.safetensors): named as
    # such, not "corrupt ... resume from another copy or --overwrite"
    adapters = tmp_path / "best.safetensors"
    harma_fast.save_adapters(model, adapters)
    with pytest.raises(CheckpointError, match=rf"{adapters} is an adapter file \(safetensors\).*--adapters"):
        load_training_state(adapters, model, "HarMA-Tiny", loss)


def test_a_flipped_bit_in_a_training_checkpoint_is_refused(tmp_path):
    """One flipped exponent bit turned a gate into 2e38, and the checkpoint loaded without complaint."""
    from harma_fast.errors import CheckpointError
    from harma_fast.trainstate import load_training_state

    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=3)
    path = tmp_path / "last.pt"
    loss = _training_checkpoint(path, model)
    gate = model.visual.transformer.resblocks[0].harma.block_gate.item()
    flipped = _flip_bit_of(path, gate)
    assert abs(flipped) > 1e30 or abs(flipped) < 1e-30  # the file now holds a wildly wrong gate
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} is corrupt: .*checksum"):
        load_training_state(path, model, "HarMA-Tiny", loss)
    assert model.visual.transformer.resblocks[0].harma.block_gate.item() == gate  # nothing was loaded


def test_training_checkpoint_of_another_backbone_is_refused(tmp_path):
    from harma_fast.errors import CheckpointError
    from harma_fast.trainstate import load_training_state

    path = tmp_path / "last.pt"
    loss = _training_checkpoint(path, harma_fast.patch(tiny_model(seed=0)))
    other = harma_fast.patch(tiny_model(seed=1))
    with pytest.raises(CheckpointError, match=rf"checkpoint {path} was trained on another backbone"):
        load_training_state(path, other, "HarMA-Tiny", loss)
    assert load_training_state(path, other, "HarMA-Tiny", loss, check_backbone=False).step == 7


def test_unreadable_adapter_files_get_one_clear_error(tmp_path):
    from harma_fast.errors import CheckpointError

    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=4)
    path = tmp_path / "best.safetensors"
    harma_fast.save_adapters(model, path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"adapter file {path} is empty \(0 bytes\)"):
        harma_fast.load_adapters(tiny_model(), path)
    path.write_bytes(random.Random(1).randbytes(4096))
    with pytest.raises(CheckpointError, match=rf"cannot read adapter file {path}: not a valid safetensors"):
        harma_fast.load_adapters(tiny_model(), path)


def test_a_flipped_bit_in_an_adapter_file_is_refused(tmp_path):
    from harma_fast.errors import CheckpointError

    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=4)
    path = tmp_path / "best.safetensors"
    harma_fast.save_adapters(model, path)
    _flip_bit_of(path, model.transformer.resblocks[1].harma.block_gate.item())
    fresh = tiny_model()
    with pytest.raises(CheckpointError, match=rf"adapter file {path} is corrupt: .*checksum"):
        harma_fast.load_adapters(fresh, path)
    assert not harma_fast.is_patched(fresh)


def test_nan_adapters_are_refused_on_loading_and_before_export(tmp_path):
    # an export ran whole, then blamed ONNX: "does not match PyTorch (max abs nan)"
    from harma_fast.errors import CheckpointError, ConfigError

    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=3)
    name, param = next(iter(adapter_state_dict(model).items()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    path = tmp_path / "nan.safetensors"
    with pytest.raises(CheckpointError, match=rf"not saving {path}: the adapters hold NaN or infinite values in "
                       rf"{name}"):
        harma_fast.save_adapters(model, path)
    assert not path.exists()
    # a file holding them all the same (written by other code, with a valid checksum) is refused on loading
    from safetensors import safe_open
    from safetensors.torch import save_file
    from harma_fast.checkpoints import tensor_checksum
    good = tmp_path / "good.safetensors"
    harma_fast.save_adapters(randomize_adapters(harma_fast.patch(tiny_model()), seed=3), good)
    with safe_open(str(good), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata=dict(metadata, checksum=tensor_checksum(tensors)))
    with pytest.raises(CheckpointError, match=rf"adapter file {path} holds NaN or infinite values in {name}"):
        harma_fast.load_adapters(harma_fast.patch(tiny_model()), path)
    pytest.importorskip("onnxruntime")
    from harma_fast.export import export_onnx

    with pytest.raises(ConfigError, match=rf"the model's {name} holds NaN or infinite values"):
        export_onnx(model, tmp_path / "onnx", model_name="HarMA-Tiny")
    assert not (tmp_path / "onnx").exists()


def test_a_released_checkpoint_that_is_no_checkpoint_is_one_clear_line(tmp_path, capsys):
    # torch's nine-line weights_only message was printed verbatim
    from harma_fast.cli import main

    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    assert main(["export", "--model", "HarMA-Tiny", "--released", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"cannot read released checkpoint {path}: it is not a PyTorch checkpoint" in err
    assert len(err.strip().splitlines()) == 1 and "weights_only" not in err
