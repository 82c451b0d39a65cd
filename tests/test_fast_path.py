"""The frozen-backbone fast path computes the reference function and saves less for backward."""
import copy

import pytest
import torch

import harma_fast
from harma_fast.checkpoints import adapter_state_dict
from harma_fast.fast import enable_fast_path
from harma_fast.losses import harma_loss_ref
from family_models import SMALL
from helpers import assert_close, randomize_adapters, sample_inputs, tiny_model


def step(model, images, tokens, ids, autocast=False):
    """One training step's loss and adapter gradients."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        img = model.encode_image(images, normalize=True)
        txt = model.encode_text(tokens, normalize=True)
        out = harma_loss_ref(img.float(), txt.float(), torch.tensor(0.07), ids)
    out.total.backward()
    grads = {k: p.grad.detach().clone() for k, p in adapter_state_dict(model).items()}
    return out.total.detach(), grads


@pytest.fixture
def models():
    ref = randomize_adapters(harma_fast.patch(tiny_model(seed=1), backend="reference"), seed=6)
    fast = copy.deepcopy(ref)
    assert enable_fast_path(fast) == 4  # 2 image + 2 text blocks
    assert all(b._harma_causal_mask == (fast, "attn_mask") for b in fast.transformer.resblocks)
    assert not any(b._harma_causal_mask for b in fast.visual.transformer.resblocks)
    return ref, fast


def test_fast_path_is_the_same_function_in_fp32(models):
    ref, fast = models
    images, tokens = sample_inputs(ref, batch=4)
    ids = torch.tensor([0, 1, 1, 2])
    loss_ref, g_ref = step(ref, images, tokens, ids)
    loss_fast, g_fast = step(fast, images, tokens, ids)
    assert_close(loss_fast, loss_ref, atol=1e-5, rtol=1e-5, name="loss")
    for k in g_ref:
        assert_close(g_fast[k], g_ref[k], atol=1e-6, rtol=1e-4, name=k)


@pytest.mark.interpreter
def test_fast_path_with_fused_kernels_under_bf16_autocast_matches_the_reference_path(models):
    ref, fast = models
    harma_fast.set_backend(fast, "triton")
    images, tokens = sample_inputs(ref, batch=4)
    ids = torch.arange(4)
    exact = step(copy.deepcopy(ref), images, tokens, ids)            # fp32
    loss_ref, g_ref = step(ref, images, tokens, ids, autocast=True)  # the library's reference path, bf16 autocast
    loss_fast, g_fast = step(fast, images, tokens, ids, autocast=True)

    def flat(grads):
        return torch.cat([grads[k].flatten() for k in exact[1]])

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    # judged against the reference path's own bf16 error; per-parameter errors of bf16 gradients
    # are noisy (a small-gradient gate is easily 40% off in either path), the whole gradient is not
    err_ref, err_fast = rel(flat(g_ref), flat(exact[1])), rel(flat(g_fast), flat(exact[1]))
    assert err_fast <= 2 * err_ref + 1e-2, f"adapter gradients: fast {err_fast:.3e} vs reference bf16 {err_ref:.3e}"
    assert rel(loss_fast, exact[0]) <= 2 * rel(loss_ref, exact[0]) + 5e-3


def saved_for_backward(model, tokens):
    """Shapes and dtypes of every activation the text forward saves (forward only)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = (tuple(t.shape), t.dtype)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.encode_text(tokens, normalize=True)
    return list(seen.values())


def test_frozen_blocks_save_only_what_input_gradients_need(models):
    ref, fast = models
    _, tokens = sample_inputs(ref, batch=4)
    n, length = tokens.shape
    width = ref.transformer.resblocks[0].mlp.c_fc.in_features
    hidden = ref.transformer.resblocks[0].mlp.c_fc.out_features
    blocks = len(ref.transformer.resblocks)
    ref_saved, fast_saved = saved_for_backward(ref, tokens), saved_for_backward(fast, tokens)
    # the reference keeps each MLP's (N, L, 4d) GELU input (but the first block's: nothing before
    # the first adapter needs a gradient); the fast path keeps none
    assert sum(s == (n, length, hidden) for s, _ in ref_saved) >= blocks - 1
    assert not [s for s, _ in fast_saved if s == (n, length, hidden)]
    # the residual stream (and so every LayerNorm input) is bf16, never an fp32 (N, L, d) copy
    assert sum(s == (n, length, width) and d == torch.float32 for s, d in ref_saved) >= blocks - 1
    assert not [s for s, d in fast_saved if s == (n, length, width) and d == torch.float32]


def test_blocks_of_other_structures_keep_the_reference_forward():
    import open_clip
    model = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(image_size=32, patch_size=16, width=64,
                                                                            layers=1, scale_attn=True),
                           text_cfg=open_clip.CLIPTextCfg(context_length=16, width=64, heads=2, layers=1))
    harma_fast.patch(model)
    assert enable_fast_path(model) == 1  # the text block; the image block has an extra attention norm
    with pytest.raises(RuntimeError, match="for patched models"):
        enable_fast_path(tiny_model())


@pytest.mark.interpreter
def test_compile_traces_through_the_fused_kernels(models):
    ref, fast = models
    harma_fast.set_backend(fast, "triton")
    images, tokens = sample_inputs(ref, batch=3)
    eager = copy.deepcopy(fast)
    compiled = torch.compile(fast, backend="aot_eager")  # AOTAutograd over our custom ops' autograd
    for model in (eager, compiled):
        out = model(images, tokens)
        (out["image_features"].sum() + out["text_features"].square().sum()).backward() if isinstance(out, dict) else \
            (out[0].sum() + out[1].square().sum()).backward()
    for (k, p), (_, q) in zip(adapter_state_dict(eager).items(), adapter_state_dict(fast).items(), strict=True):
        assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, name=k)


def test_trainer_fast_mode_finds_a_nan_without_per_step_syncs(tmp_path, monkeypatch):
    from harma_fast.data.synthetic import generate
    from harma_fast.train import TrainConfig, TrainingDiverged, train
    data = generate(tmp_path / "data", n_train=24, n_val=4, n_test=4, image_size=48)
    calls = {"n": 0}
    original = harma_fast.losses.HarMALoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        return type(out)(out.total * float("nan"), out.contrastive, out.triplet) if calls["n"] == 3 else out
    monkeypatch.setattr(harma_fast.losses.HarMALoss, "forward", poisoned)
    cfg = TrainConfig(train_file=str(data["train"]), image_root=str(data["image_root"]), model="HarMA-Tiny",
                      output_dir=str(tmp_path / "run"), epochs=2, batch_size=8, num_workers=0, progress=False,
                      fast="on", backend="reference", save_every=2, log_every=100)
    with pytest.raises(TrainingDiverged, match=r"non-finite at step 3 \(found at step 4, before any checkpoint"):
        train(cfg)
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["position"]["step"] == 2


def test_bf16_copies_of_frozen_weights_are_kept_and_renewed_when_the_weights_change(models):
    from harma_fast.fast import frozen_cast
    ref, fast = models
    weight = fast.visual.transformer.resblocks[0].mlp.c_fc.weight
    first = frozen_cast(weight, torch.bfloat16)
    assert frozen_cast(weight, torch.bfloat16) is first  # made once, reused by later steps
    assert frozen_cast(weight, torch.float32) is weight
    trainable = torch.nn.Parameter(torch.randn(3, 3))
    assert frozen_cast(trainable, torch.bfloat16).requires_grad  # trainable weights: a plain, differentiable cast
    # new backbone weights, loaded in place: every kept copy is renewed, none is served stale
    new_backbone = {k: v + 0.01 * torch.randn_like(v) for k, v in tiny_model(seed=9).state_dict().items()}
    images, tokens = sample_inputs(ref, batch=3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.encode_image(images)
        for model in (ref, fast):
            model.load_state_dict(new_backbone, strict=False)
        want, got = ref.encode_image(images).float(), fast.encode_image(images).float()
    assert frozen_cast(weight, torch.bfloat16) is not first
    assert_close(frozen_cast(weight, torch.bfloat16).float(), weight.detach().bfloat16().float(), atol=0)
    assert_close(got, want, atol=0.05 * want.abs().max().item())


def test_compiled_fast_path_under_bf16_autocast_stays_within_the_recompile_limit(models):
    # frozen_cast keeps Python state on the weights; inside a compiled graph it must not, or every
    # call recompiles it (measured: dynamo's recompile limit hit on a tiny model's first forward)
    ref, fast = models
    images, tokens = sample_inputs(ref, batch=3)
    compiled = torch.compile(copy.deepcopy(fast), backend="aot_eager")
    torch._dynamo.reset()
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = compiled(images, tokens), fast(images, tokens)
    for i, name in enumerate(("image features", "text features")):  # open_clip's CLIP returns a tuple here
        assert_close(got[i].float(), want[i].float(), atol=2e-2, name=name)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# attention masks: the fast block applies the mask it is called with, as the reference does
# --------------------------------------------------------------------------------------------
def tiny_coca(seed=0):
    """open_clip's CoCa in small: its text tower passes each block a per-batch (N·heads, L, L)
    mask (causal, plus the class token's and the padding's)."""
    import open_clip
    torch.manual_seed(seed)
    text = open_clip.CLIPTextCfg(context_length=12, vocab_size=64, width=32, heads=2, layers=2, embed_cls=True,
                                 pad_id=0, output_tokens=True)
    vision = open_clip.CLIPVisionCfg(image_size=32, layers=2, width=48, patch_size=16, head_width=24,
                                     output_tokens=True)
    multimodal = open_clip.coca_model.MultimodalCfg(context_length=12, vocab_size=64, width=32, heads=2, layers=1)
    model = open_clip.CoCa(embed_dim=16, multimodal_cfg=multimodal, text_cfg=text, vision_cfg=vision).eval()
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    tokens = torch.zeros(3, 12, dtype=torch.long)
    for i in range(3):  # end of text at varying positions, padding (id 0) after it
        tokens[i, :3 + 3 * i] = torch.arange(1, 4 + 3 * i)
    return model, images, tokens


def encode_and_backward(model, images, tokens):
    img, txt = model.encode_image(images), model.encode_text(tokens)
    (img.square().sum() + (txt * torch.linspace(-1, 1, txt.shape[-1])).sum()).backward()
    return img.detach(), txt.detach(), {k: p.grad.clone() for k, p in adapter_state_dict(model).items()}


def test_coca_text_tower_on_the_fast_path_applies_its_per_batch_mask():
    model, images, tokens = tiny_coca()
    ref = randomize_adapters(harma_fast.patch(model, SMALL, backend="reference"), seed=3)
    fast = copy.deepcopy(ref)
    assert enable_fast_path(fast) == 4  # 2 image + 2 text blocks
    want, got = encode_and_backward(ref, images, tokens), encode_and_backward(fast, images, tokens)
    assert_close(got[0], want[0], atol=1e-5, rtol=1e-5, name="image")
    assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, name="text")
    for k in want[2]:
        assert_close(got[2][k], want[2][k], atol=1e-6, rtol=1e-4, name=k)


def masked_model(kind):
    """A tiny CLIP whose text block has ``kind`` attention: ``"mha"`` (nn.MultiheadAttention) or
    ``"sdpa"`` (open_clip's Attention, in its custom block; its identity norms, which keep it off
    the fast path, are taken out: the same function)."""
    import open_clip
    torch.manual_seed(0)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1,
                                 block_type="custom" if kind == "sdpa" else None)
    model = open_clip.CLIP(embed_dim=16, text_cfg=text,
                           vision_cfg=open_clip.CLIPVisionCfg(image_size=16, patch_size=8, width=32, layers=1,
                                                                   head_width=16))
    block = model.transformer.resblocks[0]
    if kind == "sdpa":
        del block.ln_attn, block.mlp.ln
    ref = randomize_adapters(harma_fast.patch(model, SMALL, backend="reference"), seed=4)
    assert ref.transformer.resblocks[0]._harma_kind == kind
    fast = copy.deepcopy(ref)
    enable_fast_path(fast)
    assert fast.transformer.resblocks[0]._harma_fast
    return ref, fast


def block_masks(model, n=3, heads=2, length=8):
    g = torch.Generator().manual_seed(5)
    causal = model.attn_mask
    keep = torch.ones(n, length, dtype=torch.bool)
    keep[1, 5:], keep[2, 2:] = False, False  # padding keys (every query keeps at least the first)
    padding = torch.zeros(n, length, length).masked_fill(~keep[:, None, :], float("-inf"))
    return {
        "the model's causal mask": causal,
        "a copy of it": causal.clone(),
        "float (L, L)": torch.randn(length, length, generator=g) + causal,
        "float (N·heads, L, L)": (causal + padding).repeat_interleave(heads, 0),
        "bool (L, L)": torch.ones(length, length, dtype=torch.bool).triu(1),
        "bool (N·heads, L, L)": (~keep[:, None, :]).expand(n, length, length).repeat_interleave(heads, 0),
    }


@pytest.mark.parametrize("kind", ["mha", "sdpa"])
def test_fast_block_applies_any_mask_as_the_reference_block_does(kind):
    ref, fast = masked_model(kind)
    x = torch.randn(3, 8, 32, generator=torch.Generator().manual_seed(6))
    masks = {model: block_masks(model) for model in (ref, fast)}  # the same values; each model's own causal mask
    for name in masks[ref]:
        results = []
        for model in (ref, fast):
            model.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            block = model.transformer.resblocks[0]
            out = block(xi, attn_mask=masks[model][name])
            (out * torch.linspace(-1, 1, 32)).sum().backward()
            results.append((out.detach(), xi.grad, dict(block.harma.named_parameters())))
        (want, want_dx, want_p), (got, got_dx, got_p) = results
        assert_close(got, want, atol=1e-5, rtol=1e-5, name=f"{name}: output")
        assert_close(got_dx, want_dx, atol=1e-5, rtol=1e-4, name=f"{name}: input gradient")
        for k, p in want_p.items():
            assert_close(got_p[k].grad, p.grad, atol=1e-6, rtol=1e-4, name=f"{name}: {k}")


def test_the_models_own_causal_mask_runs_as_fused_causal_attention(models):
    from harma_fast.fast import _sdpa_mask
    _, fast = models
    block, mask = fast.transformer.resblocks[0], fast.attn_mask
    assert _sdpa_mask(block, mask, 3, mask.shape[0], torch.float32) == (True, None)
    moved = copy.deepcopy(fast).to(torch.float64)  # a new mask tensor: still the model's own
    assert _sdpa_mask(moved.transformer.resblocks[0], moved.attn_mask, 3, mask.shape[0], torch.float64)[0]
    # the same values in another tensor (or a caller's own mask) are applied as given
    causal, applied = _sdpa_mask(block, mask.clone(), 3, mask.shape[0], torch.float32)
    assert not causal and torch.equal(applied, mask)


# --------------------------------------------------------------------------------------------
# backbone weights unfrozen after enable_fast_path train as on the reference path
# --------------------------------------------------------------------------------------------
def trainable_grads(model, images, tokens):
    img, txt = model.encode_image(images), model.encode_text(tokens)
    (img.square().sum() + (txt * torch.linspace(-1, 1, txt.shape[-1])).sum()).backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_backbone_unfrozen_after_enable_fast_path_gets_its_gradients(models):
    ref, fast = models
    for model in (ref, fast):
        model.transformer.resblocks[-1].requires_grad_(True)  # fine-tune the last text block too
        model.visual.transformer.resblocks[0].mlp.requires_grad_(True)
    images, tokens = sample_inputs(ref, batch=3)
    want, got = trainable_grads(ref, images, tokens), trainable_grads(fast, images, tokens)
    assert "transformer.resblocks.1.mlp.c_fc.weight" in want
    for k, g in want.items():
        assert got[k] is not None, f"{k}: no gradient on the fast path"
        assert_close(got[k], g, atol=1e-5, rtol=1e-4, name=k)


def test_hf_mlp_unfrozen_after_enable_fast_path_gets_its_gradients():
    from family_models import family_inputs, hf_clip
    ref = randomize_adapters(harma_fast.patch(hf_clip()[0], SMALL, backend="reference"), seed=2)
    fast = copy.deepcopy(ref)
    assert enable_fast_path(fast) > 0
    for model in (ref, fast):
        model.text_model.encoder.layers[-1].mlp.requires_grad_(True)
    images, tokens = family_inputs(ref)
    want, got = trainable_grads(ref, images, tokens), trainable_grads(fast, images, tokens)
    assert "text_model.encoder.layers.2.mlp.fc1.weight" in want
    for k, g in want.items():
        assert got[k] is not None, f"{k}: no gradient on the fast path"
        assert_close(got[k], g, atol=1e-5, rtol=1e-4, name=k)


def test_evaluating_under_inference_mode_before_training_keeps_the_fast_path_trainable(models):
    # the bf16 copies of the frozen weights made under torch.inference_mode() (an evaluation before
    # the first step) were inference tensors: the next training step raised deep in F.linear
    # "Inference tensors cannot be saved for backward"
    ref, fast = models
    images, tokens = sample_inputs(ref, batch=3)
    ids = torch.arange(3)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast.encode_image(images), fast.encode_text(tokens)
    loss, grads = step(fast, images, tokens, ids, autocast=True)
    fresh = copy.deepcopy(ref)
    enable_fast_path(fresh)
    want, want_grads = step(fresh, images, tokens, ids, autocast=True)
    assert loss == want
    for k in want_grads:
        assert_close(grads[k], want_grads[k], atol=0, name=k)


def test_bf16_copies_of_frozen_weights_do_not_travel_with_the_model(models, tmp_path):
    # they were attributes of the weights: torch.save(model) wrote them into the file (here 16.0 ->
    # 16.7 MB; for a ViT-B-32 ~250 MB more), and unpatch left them holding memory
    ref, fast = models
    images, tokens = sample_inputs(ref, batch=3)
    torch.save(fast, tmp_path / "before.pt")
    step(fast, images, tokens, torch.arange(3), autocast=True)
    weights = [p for p in fast.parameters() if not p.requires_grad]
    assert not any(k.startswith("_harma") for p in weights for k in vars(p))
    torch.save(fast, tmp_path / "after.pt")
    before, after = ((tmp_path / f).stat().st_size for f in ("before.pt", "after.pt"))
    assert abs(after - before) < 10_000, f"{before} -> {after} bytes"
    from harma_fast.fast import _CASTS
    assert any(p in _CASTS for p in weights)  # kept, beside the weights
    harma_fast.unpatch(fast)
    assert not any(p in _CASTS for p in fast.parameters())
