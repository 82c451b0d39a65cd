"""Tiny random-initialised models of every family harma_fast adapts (no downloads).

Each builder returns ``(model, image_stack_path, text_stack_path)``; the paths are written
out here, independently of ``harma_fast.families``, for the hook-based reference.
Widths and depths differ between the towers on purpose (S is shared across them).
"""
from __future__ import annotations

import json

import pytest
import torch

from harma_fast import HarMAConfig

# Small enough for the Triton interpreter: 2 heads of 16 (adapter), 2 heads of 8 (S).
SMALL = HarMAConfig(bottleneck=32, heads=2, shared_width=16, shared_heads=2)
VOCAB, EOT, CONTEXT = 64, 63, 12
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)  # processor settings of the HF folders


def _randomize_layer_scales(model, seed=0):
    """LayerScale at random values, so a misplaced adapter (after ls2) cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2", "ls_1.gamma", "ls_2.gamma")):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)


def _open_clip_with_trunk(trunk, no_causal_mask):
    import open_clip

    text_cfg = open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=40, heads=2, layers=3,
                                     no_causal_mask=no_causal_mask, pool_type="last" if no_causal_mask else "argmax",
                                     ls_init_value=0.5)
    # open_clip builds its timm tower by name only: build a small named one, then put the tiny trunk in
    model = open_clip.CustomTextCLIP(
        embed_dim=32, text_cfg=text_cfg,
        vision_cfg=open_clip.CLIPVisionCfg(timm_model_name="vit_tiny_patch16_224", timm_model_pretrained=False,
                                           timm_pool="", timm_proj="none", image_size=32))
    model.visual.trunk = trunk
    model.visual.image_size = (32, 32)
    return model


def siglip_open_clip(seed=0):
    """open_clip SigLIP / SigLIP 2 layout: timm ViT trunk (MAP pool, no class token, LayerScale)."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    trunk = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=32,
                              global_pool="map", class_token=False, init_values=0.5)
    model = _open_clip_with_trunk(trunk, no_causal_mask=True)
    _randomize_layer_scales(model, seed)
    return model.eval(), "visual.trunk.blocks", "text.transformer.resblocks"


def eva_open_clip(seed=0):
    """open_clip EVA02-CLIP layout: timm Eva trunk (rotary embeddings, SwiGLU with its norm, gamma_2)."""
    pytest.importorskip("timm")
    from timm.models.eva import Eva

    torch.manual_seed(seed)
    trunk = Eva(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, swiglu_mlp=True, scale_mlp=True,
                use_rot_pos_emb=True, ref_feat_shape=(4, 4), num_classes=32, global_pool="token", init_values=0.3)
    model = _open_clip_with_trunk(trunk, no_causal_mask=False)
    _randomize_layer_scales(model, seed)
    return model.eval(), "visual.trunk.blocks", "text.transformer.resblocks"


def _towers(hidden_text=40, hidden_vision=48):
    text = dict(vocab_size=VOCAB, hidden_size=hidden_text, intermediate_size=2 * hidden_text, num_hidden_layers=3,
                num_attention_heads=2, max_position_embeddings=CONTEXT, eos_token_id=EOT, bos_token_id=EOT - 1,
                pad_token_id=0)
    vision = dict(hidden_size=hidden_vision, intermediate_size=2 * hidden_vision, num_hidden_layers=2,
                  num_attention_heads=2, image_size=32, patch_size=8)
    return text, vision


def hf_clip(seed=0):
    transformers = pytest.importorskip("transformers")
    from harma_fast.hf import with_clip_api

    torch.manual_seed(seed)
    text, vision = _towers()
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    model = with_clip_api(transformers.CLIPModel(config).eval())
    return model, "vision_model.encoder.layers", "text_model.encoder.layers"


def hf_siglip(seed=0):
    transformers = pytest.importorskip("transformers")
    from harma_fast.hf import with_clip_api

    torch.manual_seed(seed)
    text, vision = _towers()
    text["projection_size"] = 48  # SigLIP's text head projects to the vision width
    config = transformers.SiglipConfig(text_config=text, vision_config=vision)
    model = with_clip_api(transformers.SiglipModel(config).eval())
    return model, "vision_model.encoder.layers", "text_model.encoder.layers"


FAMILIES = {"open_clip-siglip": siglip_open_clip, "open_clip-eva": eva_open_clip,
            "hf-clip": hf_clip, "hf-siglip": hf_siglip}


def family_inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = model.visual.image_size
    images = torch.randn(batch, 3, size[0], size[1], generator=g)
    tokens = torch.randint(1, EOT - 1, (batch, CONTEXT), generator=g)
    for i in range(batch):  # end-of-text at varying positions, padding after it
        end = 2 + (i * 4) % (CONTEXT - 3)
        tokens[i, end] = EOT
        tokens[i, end + 1:] = 0
    return images, tokens


# --------------------------------------------------------------------------------------------
# Hugging Face folders, as save_pretrained writes them
# --------------------------------------------------------------------------------------------
def write_tokenizer(folder, records):
    """A word-level tokenizer over the captions: <bos> words <eos>, padded with <pad>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    words = sorted({w for r in records for c in ([r["caption"]] if isinstance(r["caption"], str) else r["caption"])
                    for w in c.lower().split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<bos>": 2, "<eos>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A <eos>",
                                                       special_tokens=[("<bos>", 2), ("<eos>", 3)])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    return len(vocab)


def hf_folder(tmp_path, records, kind="clip", context=16):
    """A tiny CLIPModel / SiglipModel saved with its processor settings and a tokenizer over ``records``."""
    import transformers

    folder = tmp_path / f"tiny-{kind}"
    folder.mkdir()
    vocab = write_tokenizer(folder, records)
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=context, eos_token_id=3, bos_token_id=2, pad_token_id=0)
    vision = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24))
    else:
        text["projection_size"] = 48
        model = transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision))
    model.save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": MEAN, "image_std": STD, "size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}}))
    return folder, model


# --------------------------------------------------------------------------------------------
# open_clip names for the timm-trunk families, so the CLI can build them with --model <name>
# --------------------------------------------------------------------------------------------
def _tiny_siglip_trunk(pretrained=False, **kwargs):
    """SigLIP's trunk in small: MAP pool, no class token, LayerScale; open_clip passes pool and head size."""
    from timm.models.vision_transformer import VisionTransformer

    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
    return VisionTransformer(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                       class_token=False, global_pool="map", init_values=0.5), **kwargs})


def _tiny_eva_trunk(pretrained=False, **kwargs):
    """EVA02's trunk in small: rotary embeddings, SwiGLU with its norm, LayerScale."""
    from timm.models.eva import Eva

    kwargs = {k: v for k, v in kwargs.items() if not k.startswith(("pretrained_cfg", "cache_dir"))}
    return Eva(**{**dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, swiglu_mlp=True,
                         scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4), init_values=0.3), **kwargs})


# open_clip configs laid out like its ViT-B-16-SigLIP and EVA02-B-16 (custom text tower, the trunk's
# own pooling), but with CLIP's BPE tokenizer (vocab 49408, no hf_tokenizer_name): nothing to download.
_TIMM_CONFIGS = {
    "HarMA-Test-ViT-MAP": dict(
        embed_dim=48, custom_text=True,
        vision_cfg=dict(image_size=32, timm_model_name="harma_test_siglip_trunk", timm_model_pretrained=False,
                        timm_pool="map", timm_proj="none"),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2, no_causal_mask=True,
                      proj_bias=True, pool_type="last")),
    "HarMA-Test-EVA": dict(
        embed_dim=32, custom_text=True,
        vision_cfg=dict(image_size=32, timm_model_name="harma_test_eva_trunk", timm_model_pretrained=False,
                        timm_pool="token", timm_proj=None),
        text_cfg=dict(context_length=16, vocab_size=49408, width=32, heads=2, layers=2)),
}


def register_timm_families(folder):
    """Make ``HarMA-Test-ViT-MAP`` and ``HarMA-Test-EVA`` open_clip names (configs written to ``folder``)."""
    timm = pytest.importorskip("timm")
    import open_clip
    from timm.models import register_model

    for name, fn in (("harma_test_siglip_trunk", _tiny_siglip_trunk), ("harma_test_eva_trunk", _tiny_eva_trunk)):
        if not timm.is_model(name):
            fn.__name__ = name
            register_model(fn)
    if not set(_TIMM_CONFIGS) <= set(open_clip.list_models()):
        for name, cfg in _TIMM_CONFIGS.items():
            (folder / f"{name}.json").write_text(json.dumps(cfg))
        open_clip.add_model_config(folder)
    return list(_TIMM_CONFIGS)


def fixed_batch_losses(name, run_dir, data):
    """HarMA loss on the first 24 training pairs: ``(fresh adapters, the run's last.pt adapters)``.

    Both on the backbone the run saved, so only the adapters (and the loss's temperature) differ.
    """
    from PIL import Image

    import harma_fast
    from harma_fast.data.transforms import eval_transform, model_image_spec
    from harma_fast.losses import HarMALoss
    from harma_fast.models import get_tokenizer
    from harma_fast.trainstate import load_training_state

    records = json.loads(data["train"].read_text())[:24]
    model = harma_fast.create_model(name, pretrained=run_dir / "backbone.pt")
    transform = eval_transform(*model_image_spec(model))
    images = torch.stack([transform(Image.open(data["image_root"] / r["image"]).convert("RGB")) for r in records])
    tokens = get_tokenizer(name)([r["caption"] for r in records])
    ids = torch.tensor([r["image_id"] for r in records])

    def batch_loss(m, loss):
        with torch.no_grad():
            return loss(m.encode_image(images, normalize=True), m.encode_text(tokens, normalize=True), ids).total.item()

    harma_fast.patch(model)
    before = batch_loss(model, HarMALoss())
    trained = HarMALoss()
    load_training_state(run_dir / "last.pt", model, name, trained, restore_rng=False)
    return before, batch_loss(model, trained)
