"""HarMA on every family: open_clip's timm towers (SigLIP, EVA) and Hugging Face CLIP / SigLIP.

For each tiny random model: patched at init equals unpatched; with random adapters the
reference path equals an independent float64 evaluation of DESIGN §1 done with forward hooks
on the *unpatched* model; the Triton kernels (interpreter) equal the reference, values and
adapter gradients; unpatch restores the model exactly; adapters round-trip through a file.
"""
import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import harma_fast
from harma_fast.checkpoints import adapter_state_dict, architecture
from harma_fast.fast import enable_fast_path
from harma_fast.patching import iter_adapters
from family_models import FAMILIES, SMALL, family_inputs
from helpers import assert_close, frozen_copy, randomize_adapters

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return FAMILIES[request.param]


def encode(model, images, tokens):
    return model.encode_image(images), model.encode_text(tokens)


# --------------------------------------------------------------------------------------------
# DESIGN §1 written out, applied with forward hooks on the MLPs of an unpatched copy
# --------------------------------------------------------------------------------------------
def _mha(x, p, prefix, heads):
    """PyTorch's own multi-head attention (no mask) on (N, L, C)."""
    x = x.transpose(0, 1)
    y, _ = F.multi_head_attention_forward(
        x, x, x, x.shape[-1], heads, p[prefix + "in_proj_weight"], p[prefix + "in_proj_bias"], None, None, False,
        0.0, p[prefix + "out_proj.weight"], p[prefix + "out_proj.bias"], training=False, need_weights=False)
    return y.transpose(0, 1)


def _design_adapter(h, p, a_pre, s_pre, config):
    """``h + σ(g_blk) A(h)`` of DESIGN §1; ``p`` the adapter tensors, ``a_pre``/``s_pre`` their key prefixes."""
    z = F.gelu(h @ p[a_pre + "down.weight"].T + p[a_pre + "down.bias"])
    a = _mha(z, p, a_pre + "attn.", config.heads)
    if s_pre is not None:
        u = a @ p[s_pre + "l1.weight"].T + p[s_pre + "l1.bias"]
        v = _mha(u, p, s_pre + "attn.", config.shared_heads)
        gs = torch.sigmoid(p[s_pre + "gate"])
        a = a + (gs * v + (1 - gs) * u) @ p[s_pre + "l2.weight"].T + p[s_pre + "l2.bias"]
    a = _mha(a, p, a_pre + "attn.", config.heads)
    ga = torch.sigmoid(p[a_pre + "gate"])
    m = ga * z + (1 - ga) * a
    return h + torch.sigmoid(p[a_pre + "block_gate"]) * (m @ p[a_pre + "up.weight"].T + p[a_pre + "up.bias"])


def design_model(unpatched, adapters, image_path, text_path, config):
    """The unpatched model with DESIGN §1 hooked onto the output of every block's MLP."""
    model = copy.deepcopy(unpatched)
    image, text = model.get_submodule(image_path), model.get_submodule(text_path)
    for path, stack in ((image_path, image), (text_path, text)):
        for i, block in enumerate(stack):
            # the text tower owns S; the image tower uses the text layer of the same relative depth
            j = i if stack is text else i * len(text) // len(stack)
            has_s = config.share == "both" or (config.share == "text" and stack is text)
            s_pre = f"{text_path}.{j}.harma.shared." if has_s else None

            def hook(module, inputs, h, a_pre=f"{path}.{i}.harma.", s_pre=s_pre):
                return _design_adapter(h, adapters, a_pre, s_pre, config)

            block.mlp.register_forward_hook(hook)
    return model


# --------------------------------------------------------------------------------------------
def test_fresh_patch_is_identity(family):
    model, _, _ = family()
    ref = frozen_copy(model)
    images, tokens = family_inputs(model)
    harma_fast.patch(model, SMALL)
    with torch.no_grad():
        for got, want, name in zip(encode(model, images, tokens), encode(ref, images, tokens), ("image", "text")):
            assert_close(got, want, atol=1e-5, name=name)


@pytest.mark.parametrize("share", ["both", "text", "none"])
def test_reference_path_is_design_section_1_in_float64(family, share):
    unpatched, image_path, text_path = family()
    unpatched = unpatched.double()
    config = dataclasses.replace(SMALL, share=share)
    model = randomize_adapters(harma_fast.patch(copy.deepcopy(unpatched), config, backend="reference"), seed=3)
    adapters = {k: v.detach() for k, v in adapter_state_dict(model).items()}
    assert any(f"{image_path}.0.harma." in k for k in adapters) and any(f"{text_path}.0.harma." in k for k in adapters)
    expected = design_model(unpatched, adapters, image_path, text_path, config)
    images, tokens = family_inputs(model)
    with torch.no_grad():
        plain = encode(unpatched, images.double(), tokens)
        got = encode(model, images.double(), tokens)
        want = encode(expected, images.double(), tokens)
    for g, w, p, name in zip(got, want, plain, ("image", "text")):
        assert (w - p).norm() > 0.01 * p.norm(), f"{name}: the adapters change little, the test would prove nothing"
        assert_close(g, w, atol=1e-10, rtol=1e-9, name=name)


@pytest.mark.interpreter
def test_triton_kernels_equal_the_reference_values_and_gradients(family):
    ref, _, _ = family()
    ref = randomize_adapters(harma_fast.patch(ref, SMALL, backend="reference"), seed=4)
    fast = harma_fast.set_backend(copy.deepcopy(ref), "triton")
    images, tokens = family_inputs(ref, batch=2)
    g = torch.Generator().manual_seed(5)
    upstream = None
    results = []
    for model in (ref, fast):
        img, txt = encode(model, images, tokens)
        if upstream is None:
            upstream = (torch.randn(img.shape, generator=g), torch.randn(txt.shape, generator=g))
        ((img * upstream[0]).sum() + (txt * upstream[1]).sum()).backward()
        results.append((img.detach(), txt.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}))
    (img_r, txt_r, grads_r), (img_f, txt_f, grads_f) = results
    assert_close(img_f, img_r, atol=1e-5, rtol=1e-4, name="image")
    assert_close(txt_f, txt_r, atol=1e-5, rtol=1e-4, name="text")
    for k in grads_r:
        assert grads_r[k].abs().sum() > 0, f"no gradient reached {k}"
        assert_close(grads_f[k], grads_r[k], atol=2e-5, rtol=2e-4, name=k)


def test_unpatch_restores_the_original_exactly(family):
    model, _, _ = family()
    classes = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    images, tokens = family_inputs(model)
    with torch.no_grad():
        before = encode(model, images, tokens)
    randomize_adapters(harma_fast.patch(model, SMALL))
    with torch.no_grad():
        assert (encode(model, images, tokens)[1] - before[1]).norm() > 0.05 * before[1].norm()
    harma_fast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = encode(model, images, tokens)
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])


def test_only_adapters_train(family):
    model, _, _ = family()
    randomize_adapters(harma_fast.patch(model, SMALL))
    images, tokens = family_inputs(model)
    sum(e.square().sum() for e in encode(model, images, tokens)).backward()
    for name, p in model.named_parameters():
        if ".harma." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"backbone parameter {name} got a gradient"


def test_adapters_round_trip_with_the_architecture_recorded(family, tmp_path):
    model, image_path, _ = family()
    randomize_adapters(harma_fast.patch(model, SMALL), seed=7)
    path = tmp_path / "adapters.safetensors"
    harma_fast.save_adapters(model, path)
    with safe_open(str(path), framework="pt") as f:
        saved = json.loads(f.metadata()["architecture"])
    assert saved == architecture(model)
    assert saved["image"][2] == ("timm" if "trunk" in image_path else "hf")

    fresh, _, _ = family()
    harma_fast.load_adapters(fresh, path)
    images, tokens = family_inputs(model)
    with torch.no_grad():
        for got, want in zip(encode(fresh, images, tokens), encode(model, images, tokens)):
            assert torch.equal(got, want)


def test_adapters_of_another_family_are_refused(tmp_path):
    from family_models import hf_clip, siglip_open_clip

    path = tmp_path / "a.safetensors"
    harma_fast.save_adapters(harma_fast.patch(siglip_open_clip()[0], SMALL), path)
    other = hf_clip()[0]
    with pytest.raises(ValueError, match=r"image tower has 2 blocks of width 48; .*\(and hf blocks, where the "
                                         r"file's are timm blocks\)"):
        harma_fast.load_adapters(other, path)
    assert not harma_fast.is_patched(other)


def test_fast_path_where_it_applies_computes_the_same_function(family):
    ref, image_path, _ = family()
    ref = randomize_adapters(harma_fast.patch(ref, SMALL, backend="reference"), seed=8)
    fast = copy.deepcopy(ref)
    count = enable_fast_path(fast)
    blocks = dict(iter_adapters(fast))
    # EVA's SwiGLU MLP has no fast path; every other block here does
    expected = len(blocks) - (2 if "eva" in family.__name__ else 0)
    assert count == expected
    images, tokens = family_inputs(ref)
    results = []
    for model in (ref, fast):
        img, txt = encode(model, images, tokens)
        (img.square().sum() + txt.sum()).backward()
        results.append((img.detach(), txt.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}))
    assert_close(results[1][0], results[0][0], atol=1e-5, rtol=1e-5, name="image")
    assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5, name="text")
    for k in results[0][2]:
        assert_close(results[1][2][k], results[0][2][k], atol=1e-6, rtol=1e-4, name=k)


def test_packed_swiglu_mlp_keeps_the_reference_on_the_fast_path():
    """EVA with swiglu_mlp and no scale_mlp uses timm's GluMlp: fc1 → chunk → act·gate → fc2. Its
    children are named as a plain Mlp's, and the fast path ran fc2(act(fc1(y))): a shape error."""
    pytest.importorskip("timm")
    from timm.layers import GluMlp
    from timm.models.eva import Eva

    from family_models import _open_clip_with_trunk

    torch.manual_seed(0)
    trunk = Eva(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, swiglu_mlp=True, scale_mlp=False,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=32, global_pool="token", init_values=0.3)
    assert isinstance(trunk.blocks[0].mlp, GluMlp)
    ref = randomize_adapters(harma_fast.patch(_open_clip_with_trunk(trunk, no_causal_mask=False).eval(), SMALL,
                                              backend="reference"), seed=8)
    fast = copy.deepcopy(ref)
    assert enable_fast_path(fast) == len(dict(iter_adapters(fast))) - 2  # the text blocks only
    images, _ = family_inputs(ref)
    with torch.no_grad():
        assert_close(fast.encode_image(images), ref.encode_image(images), atol=1e-6, name="image")


# --------------------------------------------------------------------------------------------
# one adaptable tower; what stays unsupported
# --------------------------------------------------------------------------------------------
def test_convnext_image_tower_adapts_the_text_tower_and_says_so():
    pytest.importorskip("timm")
    from timm.models.convnext import ConvNeXt

    from family_models import _open_clip_with_trunk
    torch.manual_seed(0)
    model = _open_clip_with_trunk(ConvNeXt(depths=(1, 1, 1, 1), dims=(8, 8, 8, 8), num_classes=32), no_causal_mask=False).eval()
    ref = frozen_copy(model)
    with pytest.warns(UserWarning, match="adapts the text tower only: the image tower is a timm ConvNeXt"):
        harma_fast.patch(model, SMALL)
    assert model.harma_config.towers == ("text",)
    assert all(n.startswith("text.") for n, _ in iter_adapters(model))
    images, tokens = family_inputs(model)
    with torch.no_grad():
        assert_close(model.encode_image(images), ref.encode_image(images), atol=0, name="image")


def test_vision_only_hf_model_adapts_its_image_tower_and_says_so():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=16)
    model = transformers.CLIPVisionModel(config)
    with pytest.warns(UserWarning, match="adapts the image tower only: the model has no text tower"):
        harma_fast.patch(model, harma_fast.HarMAConfig(bottleneck=16, heads=2, shared_width=8, shared_heads=2))
    assert model.harma_config.towers == ("image",)
    assert [n for n, _ in iter_adapters(model)] == [f"encoder.layers.{i}" for i in range(2)]


def test_cross_attention_block_is_refused():
    from open_clip.transformer import ResidualAttentionBlock

    from family_models import siglip_open_clip
    model = siglip_open_clip()[0]
    model.text.transformer.resblocks[1] = ResidualAttentionBlock(40, 2, is_cross_attention=True)
    with pytest.raises(TypeError, match=r"text.transformer.resblocks.1 \(ResidualAttentionBlock\) is a "
                                        r"cross-attention block .*self-attention towers only"):
        harma_fast.patch(model, SMALL)
    assert not harma_fast.is_patched(model)


def test_post_norm_timm_block_is_refused():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import ResPostBlock

    from family_models import siglip_open_clip
    model = siglip_open_clip()[0]
    model.visual.trunk.blocks[0] = ResPostBlock(48, 2)
    with pytest.raises(TypeError, match=r"visual.trunk.blocks.0 is a post-norm block"):
        harma_fast.patch(model, SMALL)
    assert not any(".harma." in n for n, _ in model.named_parameters())


def test_unknown_block_names_what_each_family_needs():
    from family_models import hf_clip
    model = hf_clip()[0]
    model.text_model.encoder.layers[2] = torch.nn.Linear(40, 40)
    with pytest.raises(TypeError, match=r"text_model.encoder.layers.2 \(Linear\) is not a transformer block .*"
                                        r"lacks ln_1.*\(open_clip block\).*layer_norm1.*\(hf block\)"):
        harma_fast.patch(model, SMALL)
