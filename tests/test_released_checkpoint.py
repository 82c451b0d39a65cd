"""Released-layout import, checked against a float64 evaluation of DESIGN §1 written here."""
import argparse
import copy
import math

import pytest
import torch

import harma_fast
from harma_fast import HarMAConfig
from helpers import sample_inputs, tiny_model

R, HEADS, RS, RS_HEADS = 128, 8, 64, 8


def released_state_dict(model, seed=0, temp=0.031):
    """A checkpoint as the released code writes it: 'model.'-prefixed backbone, adapters, temp."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1) * (0.5 / math.sqrt(shape[-1]))

    def mha(prefix, dim):
        return {f"{prefix}.in_proj_weight": rnd(3 * dim, dim), f"{prefix}.in_proj_bias": rnd(3 * dim),
                f"{prefix}.out_proj.weight": rnd(dim, dim), f"{prefix}.out_proj.bias": rnd(dim)}

    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    for tower, blocks in (("visual.transformer", model.visual.transformer.resblocks),
                          ("transformer", model.transformer.resblocks)):
        for i, block in enumerate(blocks):
            d = block.mlp.c_fc.in_features
            p = f"model.{tower}.resblocks.{i}"
            state[f"{p}.gate1"] = torch.randn((), generator=g)
            state[f"{p}.mmadapter.gate1"] = torch.randn((), generator=g)
            state.update({f"{p}.mmadapter.img_proj_down.weight": rnd(R, d), f"{p}.mmadapter.img_proj_down.bias": rnd(R),
                          f"{p}.mmadapter.img_proj_up.weight": rnd(d, R), f"{p}.mmadapter.img_proj_up.bias": rnd(d)})
            state.update(mha(f"{p}.mmadapter.multihead_attention", R))
            if tower == "transformer":
                s = f"{p}.mmadapter.BiShareAdapterxx"
                state[f"{s}.gate1"] = torch.randn((), generator=g)
                state.update({f"{s}.l1.weight": rnd(RS, R), f"{s}.l1.bias": rnd(RS),
                              f"{s}.l2.weight": rnd(R, RS), f"{s}.l2.bias": rnd(R)})
                state.update(mha(f"{s}.multihead_attention1", RS))
    state["temp"] = torch.tensor(temp)
    return state


# ---- DESIGN §1, written out independently in float64 -------------------------------------
def mha64(x, w, prefix, heads):
    """Self-attention over the tokens of x (N, L, C), one head at a time."""
    n, length, c = x.shape
    hd = c // heads
    qkv = x @ w[f"{prefix}.in_proj_weight"].double().t() + w[f"{prefix}.in_proj_bias"].double()
    q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]
    outs = []
    for hi in range(heads):
        sl = slice(hi * hd, (hi + 1) * hd)
        att = torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd), dim=-1)
        outs.append(att @ v[..., sl])
    return torch.cat(outs, -1) @ w[f"{prefix}.out_proj.weight"].double().t() + w[f"{prefix}.out_proj.bias"].double()


def adapter64(h, w, p, with_s):
    sig = torch.sigmoid
    lin = lambda x, name: x @ w[f"{name}.weight"].double().t() + w[f"{name}.bias"].double()  # noqa: E731
    z = torch.nn.functional.gelu(lin(h, f"{p}.mmadapter.img_proj_down"))
    a = mha64(z, w, f"{p}.mmadapter.multihead_attention", HEADS)
    if with_s:
        s = f"{p}.mmadapter.BiShareAdapterxx"
        u = lin(a, f"{s}.l1")
        v = mha64(u, w, f"{s}.multihead_attention1", RS_HEADS)
        gs = sig(w[f"{s}.gate1"].double())
        a = a + lin(gs * v + (1 - gs) * u, f"{s}.l2")
    a = mha64(a, w, f"{p}.mmadapter.multihead_attention", HEADS)
    ga = sig(w[f"{p}.mmadapter.gate1"].double())
    return lin(ga * z + (1 - ga) * a, f"{p}.mmadapter.img_proj_up")


def formula_model(unpatched, state):
    """The stock model in float64 whose blocks' MLP outputs h become h + σ(g_blk) A(h)."""
    ref = copy.deepcopy(unpatched).double()
    for tower, blocks in (("visual.transformer", ref.visual.transformer.resblocks),
                          ("transformer", ref.transformer.resblocks)):
        for i, block in enumerate(blocks):
            p = f"model.{tower}.resblocks.{i}"

            def hook(module, inputs, h, p=p, with_s=(tower == "transformer")):
                return h + torch.sigmoid(state[f"{p}.gate1"].double()) * adapter64(h, state, p, with_s)
            block.mlp.register_forward_hook(hook)
    return ref


@pytest.mark.parametrize("nested", [False, True])
def test_released_import_computes_the_design_formulas(tmp_path, nested):
    base = tiny_model(seed=3)
    state = released_state_dict(base, seed=5)
    path = tmp_path / "released.pth"
    torch.save({"model": state, "epoch": 3} if nested else state, path)

    model = copy.deepcopy(base)
    temp = harma_fast.load_released_checkpoint(model, path)
    assert temp == pytest.approx(0.031)
    assert model.harma_config == HarMAConfig.released()
    assert harma_fast.trainable_parameters(model).trainable > 0

    images, tokens = sample_inputs(model, batch=3)
    ref = formula_model(base, state)
    model = model.double()
    with torch.no_grad():
        got_i, want_i = model.encode_image(images.double()), ref.encode_image(images.double())
        got_t, want_t = model.encode_text(tokens), ref.encode_text(tokens)
    # the adapters really change the output, and the import reproduces the formulas
    assert (got_t - base.double().encode_text(tokens)).abs().max() > 1e-3
    assert (got_i - want_i).abs().max() < 1e-10
    assert (got_t - want_t).abs().max() < 1e-10


def test_released_import_from_state_dict_with_module_prefix():
    base = tiny_model()
    state = {k.replace("model.", "module.model.", 1) if k.startswith("model.") else k: v
             for k, v in released_state_dict(base).items()}
    model = copy.deepcopy(base)
    assert harma_fast.load_released_checkpoint(model, state) == pytest.approx(0.031)


def test_released_import_refuses_paper_layout_model():
    base = tiny_model()
    model = harma_fast.patch(copy.deepcopy(base), HarMAConfig.paper())
    with pytest.raises(ValueError, match="released layout.*share: 'both' vs 'text'"):
        harma_fast.load_released_checkpoint(model, released_state_dict(base))


def test_released_import_names_a_wrong_model(tmp_path):
    other = harma_fast.create_model("ViT-B-32")
    state = released_state_dict(tiny_model())
    with pytest.raises(ValueError, match=r"does not fit this model: \d+ shape mismatches, e\.g\. .*checkpoint .* vs model"):
        harma_fast.load_released_checkpoint(other, state)
    assert not harma_fast.is_patched(other)  # left as it was


def test_released_import_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(FileNotFoundError, match="released checkpoint .*missing.pth does not exist"):
        harma_fast.load_released_checkpoint(model, tmp_path / "missing.pth")
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="cannot read released checkpoint .*corrupt.pth: it is not a PyTorch checkpoint"):
        harma_fast.load_released_checkpoint(model, bad)
    plain = {k: v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no HarMA adapter keys.*create_model"):
        harma_fast.load_released_checkpoint(model, plain)
    pickled = tmp_path / "object.pth"
    torch.save({"model": released_state_dict(model), "args": argparse.Namespace(lr=4e-4)}, pickled)
    with pytest.raises(ValueError, match="holds Python objects besides tensors .*which harma_fast does not unpickle"):
        harma_fast.load_released_checkpoint(model, pickled)
    assert not harma_fast.is_patched(model)


# ---- wrappers, prefixes, widths, file formats (each used to be refused or misreported) ------
def _outputs(model):
    images, tokens = sample_inputs(model, batch=2)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(tokens)


@pytest.mark.parametrize("wrap", ["state_dict", "state_dict+model", "model.module.", "clip."])
def test_released_import_unwraps_common_checkpoint_layouts(wrap):
    # Lightning-style {'state_dict': ...} was reported as "no HarMA adapter keys ... use create_model",
    # and a 'model.module.' prefix (the wrapper's module under DDP) was not stripped
    base = tiny_model(seed=3)
    state = released_state_dict(base, seed=5)
    want = copy.deepcopy(base)
    harma_fast.load_released_checkpoint(want, state)
    if wrap == "state_dict":
        checkpoint = {"state_dict": state, "epoch": 2}
    elif wrap == "state_dict+model":
        checkpoint = {"state_dict": {"model": state}}
    else:  # "clip.": the released code of May 2024 kept the CLIP as HarMA.clip, not HarMA.model
        checkpoint = {(wrap + k[len("model."):] if k.startswith("model.") else k): v for k, v in state.items()}
    model = copy.deepcopy(base)
    assert harma_fast.load_released_checkpoint(model, checkpoint) == pytest.approx(0.031)
    for got, exp in zip(_outputs(model), _outputs(want)):
        assert torch.equal(got, exp)


def test_released_import_reads_the_bottleneck_from_the_weights(monkeypatch):
    # a released checkpoint trained with bottleneck 64 could not be loaded at all: the unpatched model was
    # patched with 128 (shape mismatches), and one patched with 64 was refused ("patch with HarMAConfig.released")
    monkeypatch.setattr(__import__(__name__), "R", 64)
    monkeypatch.setattr(__import__(__name__), "RS", 32)
    base = tiny_model(seed=3)
    state = released_state_dict(base, seed=5)
    model = copy.deepcopy(base)
    harma_fast.load_released_checkpoint(model, state)
    assert model.harma_config == HarMAConfig(share="text", bottleneck=64, shared_width=32)
    images, tokens = sample_inputs(model, batch=2)
    ref = formula_model(base, state)
    with torch.no_grad():
        assert (model.double().encode_text(tokens) - ref.encode_text(tokens)).abs().max() < 1e-10
    prepatched = harma_fast.patch(copy.deepcopy(base), HarMAConfig(share="text", bottleneck=64, shared_width=32,
                                                                   gate_init=0.1))  # gates come from the file
    harma_fast.load_released_checkpoint(prepatched, state)
    other = harma_fast.patch(copy.deepcopy(base), HarMAConfig.released())
    with pytest.raises(ValueError, match="bottleneck: 128 vs 64.*pass it unpatched"):
        harma_fast.load_released_checkpoint(other, state)


def test_released_import_reads_safetensors_files_whatever_the_torch_version(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    base = tiny_model(seed=3)
    state = released_state_dict(base, seed=5)
    want = copy.deepcopy(base)
    harma_fast.load_released_checkpoint(want, state)
    for name in ("released.safetensors", "released.pth"):  # by content, not by name
        path = tmp_path / name
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        # torch.load reads safetensors only by the .safetensors name, and only in recent torch (pytorch#170592,
        # 2026): the supported range starts at 2.9
        monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load used for a safetensors file"))
        model = copy.deepcopy(base)
        assert harma_fast.load_released_checkpoint(model, path) == pytest.approx(0.031)
        for got, exp in zip(_outputs(model), _outputs(want)):
            assert torch.equal(got, exp)
        monkeypatch.undo()


def test_released_checkpoint_with_its_config_object_says_how_to_extract_the_weights(tmp_path):
    # what Retrieval.py of the released code saves: {'model': state_dict, 'config': <ruamel.yaml map>}; the
    # message used to suggest torch.save(model.state_dict(), ...) and "a .safetensors file"
    model = tiny_model()
    path = tmp_path / "checkpoint_best.pth"
    torch.save({"model": released_state_dict(model), "config": argparse.Namespace(lr=4e-4)}, path)
    with pytest.raises(ValueError, match=r"released HarMA code saves its config object.*torch\.load\('.*"
                                         r"checkpoint_best\.pth', weights_only=False\)\['model'\].*\(it needs the module "
                                         r"of argparse\.Namespace installed\)") as info:
        harma_fast.load_released_checkpoint(model, path)
    assert "\n" not in str(info.value) and not harma_fast.is_patched(model)
    # the command it gives works
    extracted = tmp_path / "harma_weights.pth"
    torch.save(torch.load(path, weights_only=False)["model"], extracted)
    assert harma_fast.load_released_checkpoint(model, extracted) == pytest.approx(0.031)


def test_a_temperature_that_is_not_one_number_is_refused_before_anything_changes():
    # was: torch's "only one element tensors can be converted to Python scalars", raised after the weights
    # were loaded, leaving the model patched and loaded
    base = tiny_model(seed=3)
    state = released_state_dict(base, seed=5)
    state["temp"] = torch.tensor([0.05, 0.07])
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match=r"'temp' \(loss temperature\) of shape \(2,\).*not one number"):
        harma_fast.load_released_checkpoint(model, state)
    assert not harma_fast.is_patched(model)


def test_harma_fast_files_given_as_released_checkpoints_are_named_as_such(tmp_path):
    # an adapter file was reported as "does not fit this model: N keys missing", a training checkpoint as
    # "has no HarMA adapter keys ... for a plain CLIP checkpoint use create_model"
    from harma_fast.trainstate import FORMAT

    base = tiny_model()
    adapters = tmp_path / "best.safetensors"
    harma_fast.save_adapters(harma_fast.patch(copy.deepcopy(base)), adapters)
    last = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "adapters": {k: v for k, v in harma_fast.patch(copy.deepcopy(base)).state_dict().items()
                                               if ".harma." in k}}, last)
    for path in (adapters, last):
        model = copy.deepcopy(base)
        with pytest.raises(ValueError, match="written by harma_fast, not by the released HarMA code: pass a training "
                                             "checkpoint .* as --checkpoint, an adapter file .* as --adapters"):
            harma_fast.load_released_checkpoint(model, path)
        assert not harma_fast.is_patched(model)
    # and the other way round: a released checkpoint given as an adapter file names --released
    released = tmp_path / "released.pth"
    torch.save(released_state_dict(base), released)
    with pytest.raises(ValueError, match="for a checkpoint of the released HarMA code, --released"):
        harma_fast.load_adapters(copy.deepcopy(base), released)


def test_harma_checkpoints_given_as_backbone_weights_name_the_flag_to_use(tmp_path):
    # as --pretrained, a released checkpoint saved as {'model': ...} (Retrieval.py's layout) said only
    # "2 keys the model does not have, e.g. epoch"; an adapter file and a last.pt said no more than that either
    from harma_fast.trainstate import FORMAT

    base = tiny_model()
    released = tmp_path / "released.pth"
    torch.save({"model": released_state_dict(base), "epoch": 1}, released)
    adapters = tmp_path / "best.safetensors"
    harma_fast.save_adapters(harma_fast.patch(copy.deepcopy(base)), adapters)
    last = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "adapters": {}}, last)
    for path, flag in ((released, "--released"), (adapters, "--adapters"), (last, "--checkpoint")):
        with pytest.raises(ValueError, match=rf"does not fit HarMA-Tiny: .* pass it as {flag}"):
            harma_fast.create_model("HarMA-Tiny", pretrained=path)


def test_a_model_of_another_family_is_named():
    # a Hugging Face CLIP given a released (open_clip) checkpoint got "N keys missing"
    from family_models import hf_clip

    model = hf_clip()[0]
    with pytest.raises(ValueError, match=r"holds an open_clip CLIP .* the model given is a \w+ of another "
                                         r"family: build it with harma_fast.create_model\('ViT-B-32-quickgelu'\)"):
        harma_fast.load_released_checkpoint(model, released_state_dict(tiny_model()))
    assert not harma_fast.is_patched(model)
