import pytest
import torch
from safetensors.torch import save_file

import harma_fast


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_random_model_is_built_without_weights():
    model = harma_fast.create_model("HarMA-Tiny")
    assert model.visual.transformer.resblocks[0].mlp.c_fc.in_features == 96


@pytest.mark.parametrize("layout", ["plain", "open_clip", "safetensors"])
def test_local_checkpoint_formats(tmp_path, layout):
    torch.manual_seed(1)
    source = harma_fast.create_model("HarMA-Tiny")
    state = source.state_dict()
    if layout == "plain":       # e.g. GeoRSCLIP's RS5M_ViT-B-32_RET-2.pt
        path = tmp_path / "RS5M_tiny.pt"
        torch.save(state, path)
    elif layout == "open_clip":  # open_clip training checkpoint, DDP-prefixed
        path = tmp_path / "epoch_3.pt"
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    torch.manual_seed(2)
    model = harma_fast.create_model("HarMA-Tiny", pretrained=path)
    assert _same_weights(model, source)


def test_checkpoint_of_another_model_is_named(tmp_path):
    path = tmp_path / "b32.pt"
    torch.save(harma_fast.create_model("ViT-B-32").state_dict(), path)
    with pytest.raises(ValueError, match=r"checkpoint .*b32.pt does not fit HarMA-Tiny: \d+ shape mismatches, e.g. "):
        harma_fast.create_model("HarMA-Tiny", pretrained=path)


def test_missing_and_corrupt_checkpoint_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="pretrained checkpoint .*nothing.pt does not exist"):
        harma_fast.create_model("HarMA-Tiny", pretrained=tmp_path / "nothing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01 not torch")
    with pytest.raises(ValueError, match="cannot read checkpoint .*corrupt.pt: it is not a PyTorch checkpoint"):
        harma_fast.create_model("HarMA-Tiny", pretrained=corrupt)
    whole = tmp_path / "whole.pt"
    torch.save(harma_fast.create_model("HarMA-Tiny").state_dict(), whole)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt: it is not a PyTorch checkpoint .truncated, corrupt"):
        harma_fast.create_model("HarMA-Tiny", pretrained=truncated)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": _NotATensor(), "state_dict": {}}, pickled)  # e.g. a whole training run object
    with pytest.raises(ValueError) as err:
        harma_fast.create_model("HarMA-Tiny", pretrained=pickled)
    # torch's own message suggests weights_only=False, an unsafe retry; ours says what to do instead
    assert "holds Python objects besides tensors" in str(err.value) and "weights_only" not in str(err.value)


class _NotATensor:
    pass


def test_the_torchscript_fallback_shows_no_deprecation_notice_whatever_its_category(tmp_path, monkeypatch):
    # torch.jit.load warns that it is deprecated: a FutureWarning in torch 2.14, a DeprecationWarning
    # in torch 2.11, which got past a filter of FutureWarning alone
    import warnings
    real_load = torch.jit.load

    def load(*args, **kwargs):
        warnings.warn("`torch.jit.load` is deprecated. Please switch to `torch.export`.", DeprecationWarning)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(torch.jit, "load", load)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00\x01 not torch")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="cannot read checkpoint"):
            harma_fast.create_model("HarMA-Tiny", pretrained=corrupt)
    assert not [w for w in caught if "torch.jit.load" in str(w.message)]


def test_uncached_pretrained_tag_never_downloads(tmp_path, monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("harma_fast tried to download")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(FileNotFoundError, match="'laion2b_s34b_b79k' for ViT-B-32 are not in the local cache.*never downloads"):
        harma_fast.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'openai' for ViT-B-32 are not in the local cache"):
        harma_fast.create_model("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))


def test_uncached_pretrained_tag_names_the_cli_flag(tmp_path, monkeypatch, capsys):
    # train/eval/export said "pass its path as pretrained=...", a Python keyword the CLI user has no use for
    from harma_fast.cli import main

    monkeypatch.setattr("harma_fast.models.cached_pretrained_path", lambda *a, **k: None)  # whatever this cache holds
    assert main(["export", "--model", "ViT-B-32", "--pretrained", "openai", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass its path as --pretrained (Python: pretrained=...)" in err


def test_unknown_names_and_tags():
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-B-33'.*Did you mean"):
        harma_fast.create_model("ViT-B-33")
    with pytest.raises(ValueError, match="'georsclip' is neither a file nor a known pretrained tag of ViT-B-32"):
        harma_fast.create_model("ViT-B-32", pretrained="georsclip")


def test_precision_and_device():
    model = harma_fast.create_model("HarMA-Tiny", precision="bf16")
    assert model.visual.conv1.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision must be"):
        harma_fast.create_model("HarMA-Tiny", precision="int8")


@pytest.mark.parametrize("tag, quick", [("openai", True), ("laion2b_s34b_b79k", False)])
def test_weights_trained_with_quickgelu_get_quickgelu(tmp_path, monkeypatch, tag, quick):
    # open_clip's "openai" weights of ViT-B-32 were trained with QuickGELU (its pretrained config says
    # so; open_clip itself only warns); built with GELU, the frozen backbone computes another function
    import harma_fast.models as models
    from open_clip.transformer import QuickGELU

    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"")
    monkeypatch.setattr(models, "cached_pretrained_path", lambda *a, **k: weights)
    monkeypatch.setattr(models, "load_backbone_file", lambda *a, **k: None)  # the activation is the point
    model = harma_fast.create_model("ViT-B-32", pretrained=tag)
    for block in (model.visual.transformer.resblocks[0], model.transformer.resblocks[-1]):
        assert isinstance(block.mlp.gelu, QuickGELU) == quick


def test_openai_torchscript_file_gets_quickgelu(tmp_path, monkeypatch):
    # OpenAI's original ViT-B-32.pt (a TorchScript archive) holds QuickGELU weights; a plain state dict
    # says nothing about its activation and keeps the model config's
    import harma_fast.models as models
    from open_clip.transformer import QuickGELU

    monkeypatch.setattr(models, "load_backbone_file", lambda *a, **k: None)
    scripted = tmp_path / "ViT-B-32.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    plain = tmp_path / "plain.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    assert isinstance(harma_fast.create_model("HarMA-Tiny", pretrained=scripted).transformer.resblocks[0].mlp.gelu,
                      QuickGELU)
    assert not isinstance(harma_fast.create_model("HarMA-Tiny", pretrained=plain).transformer.resblocks[0].mlp.gelu,
                          QuickGELU)


@pytest.mark.parametrize("name", ["rsitmd-georsclip", "rsicd-georsclip", "rsitmd-clip", "rsicd-clip"])
def test_presets_build_the_activation_their_weights_were_trained_with(name):
    # GeoRSCLIP was tuned from OpenAI's CLIP (QuickGELU); its plain state dict cannot say so, the preset must
    import open_clip

    from harma_fast.cli import build_parser, train_config

    cfg = train_config(build_parser().parse_args(["train", "--preset", name]))
    quick = bool(open_clip.get_model_config(cfg.model).get("quick_gelu")) or \
        bool(open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained).get("quick_gelu"))
    assert quick, f"{name}: {cfg.model} with {cfg.pretrained} would run GELU on QuickGELU weights"
