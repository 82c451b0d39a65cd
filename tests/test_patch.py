import copy

import pytest
import torch
from torch import nn

import harma_fast
from harma_fast import HarMAConfig
from harma_fast.patching import iter_adapters
from helpers import frozen_copy, randomize_adapters, sample_inputs, tiny_model


@pytest.fixture(scope="module")
def vit_b32():
    torch.manual_seed(0)
    return harma_fast.create_model("ViT-B-32").eval()


def test_vit_b32_released_trainable_count(vit_b32):
    model = copy.deepcopy(vit_b32)
    harma_fast.patch(model, HarMAConfig.released())
    count = harma_fast.trainable_parameters(model)
    assert count.trainable == 5_934_396
    assert round(count.total / 1e6, 1) == 157.2
    assert 3.7 < count.percent < 3.9
    # with the loss temperature, as the released code counts
    assert harma_fast.trainable_parameters(model, harma_fast.HarMALoss()).trainable == 5_934_397
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".harma." in n for n in trainable)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".harma." in n)


@pytest.mark.parametrize("config, expected", [
    (HarMAConfig.paper(), 5_934_396),        # S shared by both towers: its parameters count once
    (HarMAConfig(share="none"), 5_535_792),  # 12 layers x 33,217 fewer
    (HarMAConfig(towers=("text",), share="text"), 2_771_748),
])
def test_vit_b32_other_layouts_count(vit_b32, config, expected):
    model = copy.deepcopy(vit_b32)
    harma_fast.patch(model, config)
    assert harma_fast.trainable_parameters(model).trainable == expected


def test_paper_layout_shares_one_s_per_layer(vit_b32):
    model = copy.deepcopy(vit_b32)
    harma_fast.patch(model)
    image = model.visual.transformer.resblocks
    text = model.transformer.resblocks
    for i in range(12):
        assert image[i].harma.shared is None
        assert image[i].harma.shared_module is text[i].harma.shared is not None
    # the image tower's reference is no registered child: saved and counted once
    assert not any("visual" in n and ".shared." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("config", [HarMAConfig.paper(), HarMAConfig.released()])
def test_fresh_patch_is_identity_vit_b32(vit_b32, config):
    images, tokens = sample_inputs(vit_b32, batch=2, length=77)
    ref = frozen_copy(vit_b32)
    model = harma_fast.patch(copy.deepcopy(vit_b32), config)
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-6
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() <= 1e-6


@pytest.mark.parametrize("seq_first", [False, True])
def test_fresh_patch_is_identity_tiny(seq_first):
    model = tiny_model(seq_first=seq_first)
    ref = frozen_copy(model)
    images, tokens = sample_inputs(model)
    harma_fast.patch(model)
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-6
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() <= 1e-6


def test_fresh_patch_is_identity_custom_attention_blocks():
    # open_clip's SDPA `Attention` blocks (CustomResidualAttentionBlock), chosen by structure
    import open_clip
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(image_size=32, patch_size=16, width=64, head_width=32, layers=2,
                                           scale_attn=True, ls_init_value=0.5),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, width=64, heads=2, layers=2, scale_attn=True),
    ).eval()
    assert type(model.transformer.resblocks[0]).__name__ == "CustomResidualAttentionBlock"
    ref = frozen_copy(model)
    images, tokens = sample_inputs(model, length=16)
    harma_fast.patch(model)
    with torch.no_grad():
        assert (model.encode_image(images) - ref.encode_image(images)).abs().max() <= 1e-6
        assert (model.encode_text(tokens) - ref.encode_text(tokens)).abs().max() <= 1e-6


def test_vit_l14_patches_every_block():
    torch.manual_seed(0)
    model = harma_fast.create_model("ViT-L-14")
    harma_fast.patch(model, HarMAConfig.released())
    adapters = dict(iter_adapters(model))
    assert len(adapters) == 24 + 12
    assert adapters["visual.transformer.resblocks.23"].dim == 1024
    assert adapters["transformer.resblocks.11"].dim == 768
    images, _ = sample_inputs(model, batch=1)
    with torch.no_grad():
        assert torch.isfinite(model.encode_image(images)).all()


def test_unpatch_restores_the_original_exactly():
    model = tiny_model()
    original_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    original_keys = list(model.state_dict())
    images, tokens = sample_inputs(model)
    with torch.no_grad():
        img0, txt0 = model.encode_image(images), model.encode_text(tokens)
    harma_fast.patch(model)
    randomize_adapters(model)
    with torch.no_grad():
        assert (model.encode_text(tokens) - txt0).abs().max() > 1e-3  # adapters do something
    harma_fast.unpatch(model)
    assert not harma_fast.is_patched(model)
    assert list(model.state_dict()) == original_keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == original_flags
    assert all(type(b).__name__ == "ResidualAttentionBlock" for b in model.transformer.resblocks)
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), img0)
        assert torch.equal(model.encode_text(tokens), txt0)
    harma_fast.patch(model)  # and it can be patched again


@pytest.mark.parametrize("config", [HarMAConfig.paper(), HarMAConfig.released()])
def test_gradients_reach_every_adapter_parameter_and_no_backbone_parameter(config):
    model = tiny_model()
    harma_fast.patch(model, config)
    randomize_adapters(model)
    images, tokens = sample_inputs(model)
    loss = model.encode_image(images).square().sum() + model.encode_text(tokens).square().sum()
    loss.backward()
    for name, p in model.named_parameters():
        if ".harma." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
        else:
            assert p.grad is None, f"backbone parameter {name} got a gradient"


def test_set_backend_switches_every_adapter():
    model = harma_fast.patch(tiny_model(), backend="reference")
    assert all(a.backend == "reference" for _, a in iter_adapters(model))
    harma_fast.set_backend(model, "auto")
    assert all(a.backend == "auto" and a.attn.backend == "auto" for _, a in iter_adapters(model))
    with pytest.raises(ValueError, match="backend must be one of"):
        harma_fast.set_backend(model, "cuda")


def test_patching_twice_is_an_error():
    model = harma_fast.patch(tiny_model())
    with pytest.raises(RuntimeError, match="already patched.*unpatch"):
        harma_fast.patch(model)


def test_resnet_clip_is_refused_with_what_is_supported():
    import open_clip
    model = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=32),
                           text_cfg=open_clip.CLIPTextCfg(context_length=8, width=32, heads=2, layers=1))
    with pytest.raises(TypeError, match="ResNet.*ViT CLIP models only.*Supported"):
        harma_fast.patch(model)
    assert not harma_fast.is_patched(model)


def test_non_clip_module_is_refused():
    with pytest.raises(TypeError, match="expects an open_clip or Hugging Face CLIP model .*, got Linear"):
        harma_fast.patch(nn.Linear(3, 3))


def test_unknown_block_is_refused_by_structure():
    model = tiny_model()
    model.transformer.resblocks[1] = nn.Sequential(nn.Linear(64, 64))
    with pytest.raises(TypeError, match=r"transformer.resblocks.1 \(Sequential\).*lacks ln_1"):
        harma_fast.patch(model)
    assert not harma_fast.is_patched(model)
    assert not any(".harma." in n for n, _ in model.named_parameters())


def test_unpatch_of_unpatched_model_is_an_error():
    with pytest.raises(RuntimeError, match="not patched"):
        harma_fast.unpatch(tiny_model())


def test_config_validation_messages():
    with pytest.raises(ValueError, match="share must be one of"):
        HarMAConfig(share="image")
    with pytest.raises(ValueError, match="towers must be a non-empty subset"):
        HarMAConfig(towers=("audio",))
    with pytest.raises(ValueError, match="bottleneck=100 must be a positive multiple of its heads"):
        HarMAConfig(bottleneck=100, heads=8)
    with pytest.raises(ValueError, match="towers excludes 'text'"):
        harma_fast.patch(tiny_model(), HarMAConfig(share="text", towers=("image",)))
    assert HarMAConfig.from_json(HarMAConfig.released().to_json()) == HarMAConfig.released()


def test_towers_in_different_dtypes_cannot_share_s():
    # S lived in the text tower's dtype and the fp16 image tower called it: a dtype error at the
    # first forward, after patching had said nothing
    model = tiny_model()
    model.visual.half()
    with pytest.raises(harma_fast.families.UnsupportedModelError,
                       match=r"different dtypes or on different devices \(image: float16 on cpu; text: float32 on cpu\)"):
        harma_fast.patch(model)
    assert not harma_fast.is_patched(model)
    harma_fast.patch(model, HarMAConfig(share="none"))  # nothing shared: each tower in its own dtype
    assert {a.down.weight.dtype for _, a in iter_adapters(model)} == {torch.float16, torch.float32}


def test_a_tower_alone_is_refused_and_a_part_patched_alone_is_named():
    model = tiny_model()
    with pytest.raises(harma_fast.families.UnsupportedModelError, match="takes the whole CLIP model, got its "
                       "VisionTransformer alone"):
        harma_fast.patch(model.visual)
    # a part patched on its own (by hand, through the block classes) is named, not an MRO TypeError
    from harma_fast.patching import _patched_class
    block = model.visual.transformer.resblocks[0]
    block.__class__ = _patched_class(type(block))
    with pytest.raises(RuntimeError, match=r"already patched \(visual.transformer.resblocks.0\)"):
        harma_fast.patch(model)
