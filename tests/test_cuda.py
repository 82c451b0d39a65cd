"""Kernels and the fast training step on a real GPU (skipped without one; run by benchmarks/gpu_session.sh).

Every variant training launches is checked here, in the dtype training sends, and every
autotune config (not only the one the tuner picks on this GPU) is checked for correctness.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

import harma_fast
import harma_fast.functional as HF
from harma_fast.backend import triton_interpreting
from harma_fast.kernels._common import dot_precision
from helpers import assert_close, assert_within_torch_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available() or triton_interpreting(),
                                 reason="needs a CUDA GPU with TRITON_INTERPRET=0")]
DEV = "cuda"


@pytest.fixture(autouse=True)
def ieee_fp32():
    """The fp32 tolerances are IEEE's: the kernels follow torch's TF32 switch, so pin it off here
    (an environment that turned TF32 on would fail fp32 checks that are right)."""
    from harma_fast.kernels._common import fp32_matmul
    with fp32_matmul(False):
        yield


def grads(fn, inputs, seed=0):
    inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
              for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, device=out.device, generator=torch.Generator(DEV).manual_seed(seed))
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs if isinstance(t, torch.Tensor) and t.is_floating_point()]


def compare(fast, ref, inputs, dtype, name=""):
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.ndim else t for t in inputs]
    want = grads(ref, [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in cast])
    got = grads(fast, cast)
    if dtype == torch.float32:
        for i, (g, w) in enumerate(zip(got, want, strict=True)):  # atol relative to the tensor's scale (τ = 0.001)
            assert_close(g, w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=1e-3, name=f"{name}[{i}]")
    else:
        base = grads(ref, cast)
        for i, (g, b, w) in enumerate(zip(got, base, want, strict=True)):
            assert_within_torch_error(g, b, w, atol=2 ** -8 * max(1.0, w.abs().max().item()), name=f"{name}[{i}]")


@contextlib.contextmanager
def only_config(kernel, config):
    """Make an autotuned kernel run ``config`` (a single config is launched without tuning)."""
    saved = kernel.configs, kernel.cache
    kernel.configs, kernel.cache = [config], {}
    try:
        yield
    finally:
        kernel.configs, kernel.cache = saved


def each_config(kernel, named_args=None, **kwargs):
    """Each config the tuner would try for these arguments (its prune applied: pruned configs are
    never launched, and some do not fit the chip), one at a time."""
    configs = list(kernel.configs)
    if kernel.early_config_prune and named_args is not None:
        configs = kernel.early_config_prune(configs, named_args, **kwargs)
    for config in configs:
        with only_config(kernel, config):
            yield config


# --- first: the checks only a GPU can make (a time-out cuts the end of the file, not these) ---
def test_tensors_past_2_31_elements_are_addressed_with_64_bit_offsets():
    # int32 row offsets wrap past 2**31 elements: the last rows would be read from and written to
    # the wrong place. Each kernel runs on a tensor just past it; its last rows are checked.
    from harma_fast.kernels import adapter_attention, adapter_down, adapter_up
    from harma_fast.kernels.retrieval_ranks import count_above
    from harma_fast.metrics import count_above_ref

    g = torch.Generator(DEV).manual_seed(5)
    big = 2 ** 31 // 768 + 64
    with torch.no_grad():
        h = torch.randn(big, 768, device=DEV, dtype=torch.bfloat16, generator=g)
        w, b = torch.randn(128, 768, device=DEV, generator=g) / 28, torch.randn(128, device=DEV, generator=g)
        z, _ = adapter_down.down_gelu_forward(h, w.bfloat16(), b)
        tail = slice(big - 300, big)
        assert_close(z[tail].float(), HF.down_gelu_ref(h[tail].float(), w, b), atol=3e-2, rtol=3e-2, name="down")
        w_up, b_up, gate = torch.randn(768, 128, device=DEV, generator=g) / 11, torch.zeros(768, device=DEV), \
            torch.tensor(0.4, device=DEV)
        out = adapter_up.mix_up_forward(z, z, w_up.bfloat16(), b_up, gate, h, gate, h, None)
        want = HF.mix_up_residual_ref(z[tail].float(), z[tail].float(), w_up, b_up, gate, h[tail].float(), gate,
                                      h[tail].float(), None)
        assert_close(out[tail].float(), want, atol=6e-2, rtol=3e-2, name="mix_up")
        del h, z, out
        n = 2 ** 31 // (77 * 384) + 8
        qkv = torch.randn(n, 77, 384, device=DEV, dtype=torch.bfloat16, generator=g)
        att, _ = adapter_attention.attention_forward(qkv, 8, False)
        assert_close(att[-4:].float(), HF.attention_core_ref(qkv[-4:].float(), 8), atol=3e-2, rtol=3e-2, name="attn")
        del qkv, att
        # sequence-first: the token stride is N·3C, so the last tokens' offsets pass 2**31 of their own
        n = 2 ** 31 // (76 * 384) + 64
        qkv = torch.randn(77, n, 384, device=DEV, dtype=torch.bfloat16, generator=g)
        att, _ = adapter_attention.attention_forward(qkv, 8, True)
        assert_close(att[:, -4:].float(), HF.attention_core_ref(qkv[:, -4:].float(), 8, True), atol=3e-2,
                     rtol=3e-2, name="attn seq-first")
        del qkv, att
        q = F.normalize(torch.randn(2 ** 31 // 512 + 64, 512, device=DEV, generator=g), dim=1).bfloat16()
        gal = F.normalize(torch.randn(256, 512, device=DEV, generator=g), dim=1).bfloat16()
        label = torch.randint(0, 256, (q.shape[0],), device=DEV, generator=g)
        got = count_above(q, gal, label, torch.arange(256, device=DEV))
        want = count_above_ref(q[-500:], gal, label[-500:], torch.arange(256, device=DEV))
        # near-ties may round either way between cuBLAS and the kernel: counts within one
        assert (got[-500:] - want).abs().max() <= 1 and (got[-500:] == want).float().mean() > 0.9


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_duplicates_of_the_ground_truth_tie_on_the_gpu(dtype):
    # the kernel's ground-truth pass and its counting pass must give bit-identical scores (tensor
    # cores included), so that an exact duplicate of the ground truth ties with it and never
    # counts; were ties broken by rounding, about half of the duplicated cases would be off by one
    from harma_fast.metrics import retrieval_ranks
    g = torch.Generator(DEV).manual_seed(4)
    n_img, d = 3000, 512
    image = F.normalize(torch.randn(n_img, d, device=DEV, generator=g), dim=1)
    image[1500:2000] = image[:500]  # duplicated images under other owners
    tti = torch.arange(n_img, device=DEV).repeat_interleave(5)
    tti = tti[torch.randperm(len(tti), device=DEV, generator=g)]  # captions shuffled, as in a real file
    text = F.normalize(image[tti] + 0.5 * torch.randn(len(tti), d, device=DEV, generator=g), dim=1)
    image, text = image.to(dtype), text.to(dtype)
    i2t, t2i = retrieval_ranks(image, text, tti, backend="triton")
    # float64 on the same (rounded) values: exact duplicates tie exactly, and ties do not count
    s = image.double() @ text.double().t()
    index = torch.arange(n_img, device=DEV)
    own = tti[None, :] == index[:, None]
    best = s.masked_fill(~own, float("-inf")).amax(1, keepdim=True)
    want_i2t = ((s > best) & ~own).sum(1)
    st = s.t()
    want_t2i = ((st > st.gather(1, tti[:, None])) & (index[None, :] != tti[:, None])).sum(1)
    duplicated = (tti < 500) | ((tti >= 1500) & (tti < 2000))
    off = t2i != want_t2i
    # near-ties that are not exact may round either way in fp32/bf16: a few, not half
    assert off[duplicated].float().mean() < 0.02, f"{int(off[duplicated].sum())} of {int(duplicated.sum())}"
    assert off.float().mean() < 0.02 and (i2t != want_i2t).float().mean() < 0.02


# --- every kernel, every config, in the dtypes training sends ---
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, d", [(50, 768), (77, 512)])
def test_down_gelu_every_config(dtype, length, d):
    from harma_fast.kernels import adapter_down
    g = torch.Generator(DEV).manual_seed(0)
    h = torch.randn(64, length, d, device=DEV, generator=g)
    w, b = torch.randn(128, d, device=DEV, generator=g) * d ** -0.5, torch.randn(128, device=DEV, generator=g) * 0.1
    for config in each_config(adapter_down._down_gelu_fwd_kernel, {"h_ptr": h.to(dtype)}):
        compare(adapter_down.down_gelu, HF.down_gelu_ref, [h, w, b], dtype, name=str(config))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length, d", [(50, 768), (77, 512)])
@pytest.mark.parametrize("variant", ["block", "block_layerscale", "block_fp32_residual", "shared_subadapter"])
def test_mix_up_every_config(dtype, length, d, variant):
    from harma_fast.kernels import adapter_up
    g = torch.Generator(DEV).manual_seed(1)
    n = 64
    r, out_d = (64, 128) if variant == "shared_subadapter" else (128, d)
    z, a = (torch.randn(n, length, r, device=DEV, generator=g) for _ in range(2))
    h, x = (torch.randn(n, length, out_d, device=DEV, generator=g) for _ in range(2))
    wu = torch.randn(out_d, r, device=DEV, generator=g) * r ** -0.5
    bu = torch.randn(out_d, device=DEV, generator=g) * 0.1
    gm, go = torch.tensor(0.6, device=DEV), torch.tensor(-0.3, device=DEV)
    gamma = torch.rand(out_d, device=DEV, generator=g) + 0.5
    if variant == "shared_subadapter":  # a + mix(v, u) W₂ᵀ + b₂: no block gate, residual or γ
        fast, ref, inputs = adapter_up.mix_up_residual, HF.mix_up_residual_ref, [z, a, wu, bu, gm, h]
    elif variant == "block_fp32_residual":  # under autocast: bf16 MLP output h, fp32 residual stream x
        def fast(*t):
            return adapter_up.mix_up_residual(*t, x)

        def ref(*t):  # fp32 x as autocast leaves it (float64 for the float64 reference)
            return HF.mix_up_residual_ref(*t, x.double() if t[5].dtype == torch.float64 else x)
        inputs = [z, a, wu, bu, gm, h, go]
    else:
        gam = gamma if variant == "block_layerscale" else None

        def fast(*t):
            return adapter_up.mix_up_residual(*t, gam.to(t[5].dtype) if gam is not None else None)

        def ref(*t):
            return HF.mix_up_residual_ref(*t, gam.to(t[5].dtype) if gam is not None else None)
        inputs = [z, a, wu, bu, gm, h, go, x]
    tuned = ({"z_ptr": z.to(dtype)}, {"DOT_PRECISION": dot_precision(dtype)})
    for fwd in each_config(adapter_up._mix_up_fwd_kernel, tuned[0], **tuned[1]):
        for bwd in each_config(adapter_up._mix_up_bwd_kernel, tuned[0], **tuned[1]):
            compare(fast, ref, inputs, dtype, name=f"{variant} fwd {fwd} bwd {bwd}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [50, 77, 128])
@pytest.mark.parametrize("width", [128, 64])  # head dim 16 (the adapter), 8 (the shared sub-adapter)
@pytest.mark.parametrize("seq_first", [False, True])
def test_attention(dtype, length, width, seq_first):
    from harma_fast.kernels import adapter_attention
    g = torch.Generator(DEV).manual_seed(2)
    shape = (length, 64, 3 * width) if seq_first else (64, length, 3 * width)
    qkv = torch.randn(shape, device=DEV, generator=g)
    compare(lambda t: adapter_attention.attention_core(t, 8, seq_first),
            lambda t: HF.attention_core_ref(t, 8, seq_first), [qkv], dtype)


LOSS_CASES = [  # (B, ids, max_violation, gamma, tau)
    (512, "repeated", False, 2.0, 0.07),
    (1000, "repeated", False, 2.0, 0.07),
    (1000, None, False, 2.0, 0.07),
    (1000, "repeated", True, 2.0, 0.07),
    (777, "repeated", False, 0.5, 0.07),
    (777, None, True, 3.0, 0.07),
    (512, "repeated", False, 2.0, 0.001),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32: what the reference path sends
@pytest.mark.parametrize("b, ids_kind, max_violation, gamma, tau", LOSS_CASES)
def test_loss_kernels(dtype, b, ids_kind, max_violation, gamma, tau):
    from harma_fast.kernels.similarity_loss import harma_loss
    from harma_fast.losses import harma_loss_ref
    g = torch.Generator(DEV).manual_seed(1)
    i = F.normalize(torch.randn(b, 512, device=DEV, generator=g), dim=1)
    t = F.normalize(i + torch.randn(b, 512, device=DEV, generator=g), dim=1)
    ids = torch.arange(b, device=DEV) // 5 if ids_kind else None
    tau_t = torch.tensor(tau, device=DEV)
    compare(lambda i, t, tau: torch.stack(harma_loss(i, t, tau, ids, 0.2, gamma, max_violation)).sum(),
            lambda i, t, tau: sum(harma_loss_ref(i, t, tau, ids, 0.2, gamma, max_violation)), [i, t, tau_t], dtype)


def test_rank_count_kernel_against_float64():
    # fp32 summation order flips near-ties, so exact equality with an fp32 cuBLAS count is a coin
    # flip: bracket the count by float64 counts with the threshold moved by ±eps instead
    from harma_fast.kernels.retrieval_ranks import count_above
    g = torch.Generator(DEV).manual_seed(2)
    q = F.normalize(torch.randn(2000, 512, device=DEV, generator=g), dim=1)
    gal = F.normalize(torch.randn(5000, 512, device=DEV, generator=g), dim=1)
    label = torch.randint(0, 5000, (2000,), device=DEV, generator=g)
    owner = torch.arange(5000, device=DEV)
    s64 = q.double() @ gal.double().t()
    thr = s64.gather(1, label[:, None]).squeeze(1).float()  # the ground truth's score
    other = owner[None, :] != label[:, None]
    eps = 1e-5  # >> the fp32 error of a 512-term dot of unit vectors
    lo = ((s64 > thr.double()[:, None] + eps) & other).sum(1)
    hi = ((s64 > thr.double()[:, None] - eps) & other).sum(1)
    got = count_above(q, gal, label, owner)
    assert ((lo <= got) & (got <= hi)).all(), (got - lo).abs().max()
    exact = lo == hi
    assert exact.float().mean() > 0.5 and torch.equal(got[exact], lo[exact])



def compare_tf32(fast, ref, inputs, name=""):
    """fp32 with TF32 allowed (both paths follow torch's switch): within 2x torch's own TF32 error
    plus bf16's atol (TF32 keeps 10 mantissa bits to bf16's 7), against float64."""
    want = grads(ref, [t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs])
    base, got = grads(ref, inputs), grads(fast, inputs)
    for i, (g, b, w) in enumerate(zip(got, base, want, strict=True)):
        assert_within_torch_error(g, b, w, atol=2 ** -8 * max(1.0, w.abs().max().item()), name=f"{name}[{i}]")


def test_every_kernel_with_tf32_allowed():
    # Every other GPU test pins fp32 to IEEE; a user who allows TF32 (set_float32_matmul_precision
    # ("high")) gets other builds (tensor-core tiles staged in shared memory, pruned configs). Each
    # kernel runs here with TF32 allowed, every mix-up config the TF32 prune keeps included. First
    # the real tuner, IEEE then TF32 in one process: its cache once reused an IEEE pick (128x128
    # tiles) under TF32, a launch that needs more shared memory than the chip has.
    from harma_fast.kernels import adapter_attention, adapter_up
    from harma_fast.kernels._common import fp32_matmul
    from harma_fast.kernels.retrieval_ranks import count_above
    from harma_fast.kernels.similarity_loss import harma_loss
    from harma_fast.losses import harma_loss_ref
    g = torch.Generator(DEV).manual_seed(7)
    z, a = (torch.randn(64, 50, 128, device=DEV, generator=g) for _ in range(2))
    h, x = (torch.randn(64, 50, 768, device=DEV, generator=g) for _ in range(2))
    wu, bu = torch.randn(768, 128, device=DEV, generator=g) / 11, torch.randn(768, device=DEV, generator=g) * 0.1
    gm, go = torch.tensor(0.6, device=DEV), torch.tensor(-0.3, device=DEV)
    inputs = [z, a, wu, bu, gm, h, go, x]
    kernels = (adapter_up._mix_up_fwd_kernel, adapter_up._mix_up_bwd_kernel)
    saved = [k.cache for k in kernels]
    try:
        for k in kernels:
            k.cache = {}
        for tf32 in (False, True):
            with fp32_matmul(tf32):
                grads(adapter_up.mix_up_residual, inputs)  # tunes (each precision on its own)
    finally:
        for k, c in zip(kernels, saved):
            k.cache = c
    with fp32_matmul(True):
        tuned = ({"z_ptr": z}, {"DOT_PRECISION": "tf32"})
        for fwd in each_config(adapter_up._mix_up_fwd_kernel, *tuned[:1], **tuned[1]):
            for bwd in each_config(adapter_up._mix_up_bwd_kernel, *tuned[:1], **tuned[1]):
                compare_tf32(adapter_up.mix_up_residual, HF.mix_up_residual_ref, inputs, name=f"fwd {fwd} bwd {bwd}")
        compare_tf32(HF.down_gelu, HF.down_gelu_ref, [h, wu.t().contiguous(), bu[:128]], name="down")
        for width in (128, 64):
            qkv = torch.randn(64, 77, 3 * width, device=DEV, generator=g)
            compare_tf32(lambda t: adapter_attention.attention_core(t, 8, False),
                         lambda t: HF.attention_core_ref(t, 8, False), [qkv], name=f"attention {width}")
        i = F.normalize(torch.randn(1000, 512, device=DEV, generator=g), dim=1)
        t = F.normalize(i + torch.randn(1000, 512, device=DEV, generator=g), dim=1)
        ids = torch.arange(1000, device=DEV) // 5
        compare_tf32(lambda i, t, tau: torch.stack(harma_loss(i, t, tau, ids)).sum(),
                     lambda i, t, tau: sum(harma_loss_ref(i, t, tau, ids)), [i, t, torch.tensor(0.07, device=DEV)],
                     name="loss")
        # ranks: TF32 rounds each operand by up to 2^-10 (relative), so a score of unit vectors moves
        # by at most ~2e-3; counts must lie between the float64 counts with the threshold moved ±5e-3
        q, gal = i[:500], t
        label, owner = torch.arange(500, device=DEV), torch.arange(1000, device=DEV)  # query k's truth: text k
        got = count_above(q, gal, label, owner)
    s64 = q.double() @ gal.double().t()
    thr = s64.gather(1, label[:, None])
    other = owner[None, :] != label[:, None]
    lo, hi = ((s64 > thr + 5e-3) & other).sum(1), ((s64 > thr - 5e-3) & other).sum(1)
    assert ((lo <= got) & (got <= hi)).all(), (got - lo).abs().max()

def test_fast_train_step_matches_reference_path():
    from harma_fast.checkpoints import adapter_state_dict
    from harma_fast.fast import enable_fast_path
    torch.manual_seed(0)
    ref = harma_fast.patch(harma_fast.create_model("ViT-B-32"), backend="reference").to(DEV)
    with torch.no_grad():
        for p in adapter_state_dict(ref).values():
            if p.ndim:
                p.normal_(0, 0.3 * p.shape[-1] ** -0.5)
    fast = harma_fast.set_backend(copy.deepcopy(ref), "triton")
    enable_fast_path(fast)
    g = torch.Generator(DEV).manual_seed(3)
    images = torch.randn(32, 3, 224, 224, device=DEV, generator=g)
    tokens = torch.randint(1, 49406, (32, 77), device=DEV, generator=g)
    tokens[:, 20] = 49407
    results = []
    for model, autocast in ((copy.deepcopy(ref), False), (ref, True), (fast, True)):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            image_f, text_f = model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)
            # as the trainer sends them: bf16 into the fused loss, fp32 into the reference
            dtype = torch.bfloat16 if model is fast else torch.float32
            loss = harma_fast.HarMALoss(backend="triton" if model is fast else "reference").to(DEV)
            out = loss(image_f.to(dtype), text_f.to(dtype))
        out.total.backward()
        results.append((out.total.item(), torch.cat([p.grad.flatten() for p in adapter_state_dict(model).values()])))
    (l32, g32), (lref, gref), (lfast, gfast) = results
    err_ref, err_fast = ((gref - g32).norm() / g32.norm()).item(), ((gfast - g32).norm() / g32.norm()).item()
    assert err_fast <= 2 * err_ref + 1e-2, (err_fast, err_ref)
    assert abs(lfast - l32) <= 2 * abs(lref - l32) + 5e-3 * abs(l32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from harma_fast.data.synthetic import generate
    return generate(tmp_path_factory.mktemp("data"), n_train=64, n_val=8, n_test=8, image_size=48, seed=1)


@pytest.mark.parametrize("compile", [False, True])
def test_trainer_step_fused_loss_without_host_syncs(data, tmp_path, compile):
    """One real Trainer step (fast path, fused loss, bf16 autocast): no host synchronisation, and
    the features reach the fused loss in the dtype the trainer chose (bf16), not autocast's fp32."""
    from harma_fast.train import TrainConfig, Trainer
    config = TrainConfig(train_file=str(data["train"]), image_root=str(data["image_root"]), model="HarMA-Tiny",
                         output_dir=str(tmp_path / "run"), epochs=1, batch_size=16, num_workers=0, progress=False,
                         device="cuda", fast="on", compile=compile, seed=3)
    trainer = Trainer(config)
    assert trainer.fast and trainer.precision == "bf16"
    seen = []
    forward = trainer.loss.forward

    def recording_forward(image_f, text_f, ids=None):
        seen.append((image_f.dtype, text_f.dtype))
        return forward(image_f, text_f, ids)
    trainer.loss.forward = recording_forward
    batches = iter(trainer._loader(0, 0))
    images, tokens, ids = next(batches)
    trainer._step(images, tokens, ids, sync=True)  # warm-up: autotuning and compilation synchronise
    images, tokens, ids = next(batches)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = trainer._step(images, tokens, ids, sync=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert seen == [(torch.bfloat16, torch.bfloat16)] * 2
    assert torch.isfinite(out.total).item()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fp16_through_every_adapter_kernel():
    # the kernels accept fp16 (a user's own autocast); training sends bf16 or fp32: one config each
    from harma_fast.kernels import adapter_attention, adapter_down, adapter_up
    g = torch.Generator(DEV).manual_seed(6)
    h, x = (torch.randn(8, 50, 512, device=DEV, generator=g) for _ in range(2))
    w, b = torch.randn(128, 512, device=DEV, generator=g) / 22, torch.randn(128, device=DEV, generator=g) * 0.1
    with only_config(adapter_down._down_gelu_fwd_kernel, adapter_down._down_gelu_fwd_kernel.configs[0]):
        compare(adapter_down.down_gelu, HF.down_gelu_ref, [h, w, b], torch.float16, name="down fp16")
    z, a = (torch.randn(8, 50, 128, device=DEV, generator=g) for _ in range(2))
    wu, bu = torch.randn(512, 128, device=DEV, generator=g) / 11, torch.randn(512, device=DEV, generator=g) * 0.1
    gm, go = torch.tensor(0.6, device=DEV), torch.tensor(-0.3, device=DEV)
    with only_config(adapter_up._mix_up_fwd_kernel, adapter_up._mix_up_fwd_kernel.configs[0]), \
            only_config(adapter_up._mix_up_bwd_kernel, adapter_up._mix_up_bwd_kernel.configs[0]):
        compare(adapter_up.mix_up_residual, HF.mix_up_residual_ref, [z, a, wu, bu, gm, h, go, x], torch.float16,
                name="mix_up fp16")
    qkv = torch.randn(8, 77, 384, device=DEV, generator=g)
    compare(lambda t: adapter_attention.attention_core(t, 8, False), lambda t: HF.attention_core_ref(t, 8, False),
            [qkv], torch.float16, name="attention fp16")


def test_auto_takes_float64_to_the_reference():
    # tl.dot has no float64: "auto" must route such features to the reference, not raise
    torch.manual_seed(0)
    image, text = (F.normalize(torch.randn(37, 24, dtype=torch.float64, device=DEV), dim=-1) for _ in range(2))
    ids = torch.arange(37, device=DEV) // 2
    got = harma_fast.HarMALoss(backend="auto").to(DEV)(image, text, ids)
    want = harma_fast.HarMALoss(backend="reference").to(DEV)(image, text, ids)
    assert torch.equal(got.total, want.total) and got.total.dtype == torch.float64
