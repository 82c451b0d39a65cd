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
    with pytest.raises(ValueError, match="holds Python objects besides tensors, which harma_fast does not unpickle"):
        harma_fast.load_released_checkpoint(model, pickled)
    assert not harma_fast.is_patched(model)
