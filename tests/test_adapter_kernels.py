"""Fused adapter kernels (Triton interpreter on CPU) against the PyTorch references."""
import copy

import pytest
import torch

import harma_fast
import harma_fast.functional as HF
from harma_fast.checkpoints import adapter_state_dict
from helpers import assert_close, assert_within_torch_error, randomize_adapters, sample_inputs, tiny_model

pytestmark = pytest.mark.interpreter
down = pytest.importorskip("harma_fast.kernels.adapter_down")
up = pytest.importorskip("harma_fast.kernels.adapter_up")
attn = pytest.importorskip("harma_fast.kernels.adapter_attention")

FP32_TOL = dict(atol=2e-5, rtol=2e-5)


def run(fn, inputs, upstream_seed=99):
    """Output and the gradient of every floating input under one shared upstream gradient."""
    inputs = [t.detach().clone().requires_grad_() if isinstance(t, torch.Tensor) else t for t in inputs]
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed)).bfloat16()  # exact in any dtype
    out.backward(g.to(out.dtype))
    return [out.detach()] + [t.grad for t in inputs if isinstance(t, torch.Tensor)]


def check(fast, ref, inputs, dtype, names):
    """fp32: against the float64 reference. bf16: within 2x torch's own bf16 error + atol, both
    measured against float64 on the same bf16-rounded inputs (so each path is charged for its own
    arithmetic, not for the rounding of the inputs, which both share)."""
    cast = [t.to(dtype) if isinstance(t, torch.Tensor) and t.ndim > 0 else t for t in inputs]
    want = run(ref, [t.double() if isinstance(t, torch.Tensor) else t for t in cast])
    got = run(fast, cast)
    if dtype == torch.float32:
        for name, g, w in zip(names, got, want, strict=True):
            assert g is not None, f"{name}: no gradient"
            assert_close(g, w, name=name, **FP32_TOL)
    else:
        base = run(ref, cast)
        for name, g, b, w in zip(names, got, base, want, strict=True):
            assert g is not None, f"{name}: no gradient"
            # plus one bf16 unit (2^-8) of the magnitude: reductions of bf16-rounded terms are noisy
            assert_within_torch_error(g, b, w, atol=2 ** -8 * max(1.0, w.abs().max().item()), name=name)


SHAPES = [(1, 1, 96), (3, 5, 512), (1, 50, 768), (3, 77, 96), (1, 77, 512)]  # (batch, L, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, d", SHAPES)
def test_down_gelu(gen, dtype, batch, length, d):
    h = torch.randn(batch, length, d, generator=gen)
    w = torch.randn(128, d, generator=gen) * d ** -0.5
    b = torch.randn(128, generator=gen) * 0.1
    check(down.down_gelu, HF.down_gelu_ref, [h, w, b], dtype, ["z", "dh", "dW", "db"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length, d", SHAPES)
@pytest.mark.parametrize("up_weights", ["zero", "random"])
def test_mix_up_residual_block_output(gen, dtype, batch, length, d, up_weights):
    r = 128
    z, a = (torch.randn(batch, length, r, generator=gen) for _ in range(2))
    h, x = (torch.randn(batch, length, d, generator=gen) for _ in range(2))
    w = torch.randn(d, r, generator=gen) * r ** -0.5 if up_weights == "random" else torch.zeros(d, r)
    b = torch.randn(d, generator=gen) * 0.1 if up_weights == "random" else torch.zeros(d)
    g_mix, g_out = torch.tensor(0.6), torch.tensor(-0.3)
    gamma = torch.rand(d, generator=gen) + 0.5

    def fused(z, a, w, b, gm, h, go, x):  # γ is a frozen LayerScale: no gradient asked for
        return up.mix_up_residual(z, a, w, b, gm, h, go, x, gamma.to(h.dtype))

    def ref(z, a, w, b, gm, h, go, x):
        return HF.mix_up_residual_ref(z, a, w, b, gm, h, go, x, gamma.to(h.dtype))
    check(fused, ref, [z, a, w, b, g_mix, h, g_out, x], dtype,
          ["out", "dz", "da", "dW", "db", "dg_a", "dh", "dg_blk", "dx"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 50), (1, 77)])
def test_mix_up_residual_as_shared_subadapter_output(gen, dtype, batch, length):
    v, u = (torch.randn(batch, length, 64, generator=gen) for _ in range(2))
    a = torch.randn(batch, length, 128, generator=gen)
    w, b = torch.randn(128, 64, generator=gen) * 0.125, torch.randn(128, generator=gen) * 0.1
    check(up.mix_up_residual, HF.mix_up_residual_ref, [v, u, w, b, torch.tensor(0.6), a], dtype,
          ["out", "dv", "du", "dW2", "db2", "dg_s", "da"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 5), (1, 50), (3, 77)])
@pytest.mark.parametrize("width, heads", [(128, 8), (64, 8)])
@pytest.mark.parametrize("seq_first", [False, True])
def test_attention_core(gen, dtype, batch, length, width, heads, seq_first):
    shape = (length, batch, 3 * width) if seq_first else (batch, length, 3 * width)
    qkv = torch.randn(shape, generator=gen)
    check(lambda t: attn.attention_core(t, heads, seq_first), lambda t: HF.attention_core_ref(t, heads, seq_first),
          [qkv], dtype, ["out", "dqkv"])


def test_attention_sdpa_path_equals_reference(gen):
    qkv = torch.randn(2, 130, 384, generator=gen, dtype=torch.float64)  # > MAX_L: the SDPA route
    assert_close(attn.attention_core(qkv, 8), HF.attention_core_ref(qkv, 8), atol=1e-12)
    assert_close(attn.attention_sdpa(qkv.transpose(0, 1), 8, True), HF.attention_core_ref(qkv.transpose(0, 1), 8, True),
                 atol=1e-12)


@pytest.mark.parametrize("config, seq_first", [
    *[(config, seq_first) for config in (harma_fast.HarMAConfig.paper(), harma_fast.HarMAConfig.released())
      for seq_first in (False, True)],
    # past the fused kernels' bottleneck: down/up run the reference (a ValueError from the kernel
    # before), the attention its kernel
    (harma_fast.HarMAConfig(bottleneck=384, heads=24, share="none"), False)],
    ids=["paper", "paper-seq-first", "released", "released-seq-first", "wide"])
def test_whole_tiny_model_triton_equals_reference(config, seq_first):
    base = tiny_model(seq_first=seq_first)
    ref = randomize_adapters(harma_fast.patch(copy.deepcopy(base), config, backend="reference"), seed=3)
    fast = harma_fast.set_backend(copy.deepcopy(ref), "triton")
    images, tokens = sample_inputs(base, batch=3)
    outs = []
    for model in (ref, fast):
        img, txt = model.encode_image(images), model.encode_text(tokens)
        (img.square().sum() + (txt * torch.linspace(-1, 1, txt.shape[1])).sum()).backward()
        outs.append((img.detach(), txt.detach(), {k: p.grad for k, p in adapter_state_dict(model).items()}))
    assert_close(outs[1][0], outs[0][0], atol=1e-5, rtol=1e-5, name="image embeddings")
    assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5, name="text embeddings")
    for key, g in outs[0][2].items():
        assert g is not None and outs[1][2][key] is not None, key
        assert_close(outs[1][2][key], g, atol=1e-5, rtol=1e-4, name=key)


def test_bottlenecks_past_the_kernels_run_the_reference(gen, monkeypatch):
    assert down.MAX_R == up.MAX_R == HF.MAX_FUSED_BOTTLENECK == 128
    h, w, b = torch.randn(2, 5, 32, generator=gen), torch.randn(192, 32, generator=gen), torch.randn(192, generator=gen)
    monkeypatch.setattr(down, "down_gelu", lambda *a: (_ for _ in ()).throw(AssertionError("kernel past MAX_R")))
    monkeypatch.setattr(up, "mix_up_residual", lambda *a: (_ for _ in ()).throw(AssertionError("kernel past MAX_R")))
    z = HF.down_gelu(h, w, b, backend="triton")
    assert_close(z, HF.down_gelu_ref(h, w, b), atol=0)
    gate = torch.tensor(0.3)
    out = HF.mix_up_residual(z, z, w.t(), b[:32], gate, h, gate, h, backend="triton")
    assert_close(out, HF.mix_up_residual_ref(z, z, w.t(), b[:32], gate, h, gate, h), atol=0)


def test_auto_backend_uses_reference_on_cpu(monkeypatch):
    model = harma_fast.patch(tiny_model(), backend="auto")
    monkeypatch.setattr(down, "down_gelu", lambda *a: (_ for _ in ()).throw(AssertionError("triton on CPU")))
    images, _ = sample_inputs(model)
    model.encode_image(images)


def test_compiled_adapter_has_no_graph_break(gen):
    import torch._dynamo
    from harma_fast.modules import HarMAAdapter
    adapter = HarMAAdapter(96, 128, 8, 0.6)
    adapter.set_backend("triton")
    h, x = torch.randn(2, 5, 96, generator=gen), torch.randn(2, 5, 96, generator=gen)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(lambda h, x: adapter(h, x=x))(h, x)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("seq_first", [False, True])
def test_attention_core_on_a_strided_qkv(gen, seq_first):
    # a token slice of a larger projection: the gradient used to be written with qkv's strides
    # into a contiguous buffer (wrong values on CPU, out-of-bounds writes on a GPU)
    full = torch.randn((9, 3, 3 * 64) if seq_first else (3, 9, 3 * 64), generator=gen)
    sliced = (lambda t: t[1:8]) if seq_first else (lambda t: t[:, 1:8])
    check(lambda t: attn.attention_core(sliced(t), 8, seq_first),
          lambda t: HF.attention_core_ref(sliced(t), 8, seq_first), [full], torch.float32, ["out", "dqkv"])


def gpu_configs(module, name, monkeypatch):
    """The autotune configs a GPU tries (the interpreter is given one small config of its own)."""
    with monkeypatch.context() as m:
        m.setattr(module, "interpreting", lambda: False)
        return getattr(module, name)()


@pytest.mark.parametrize("which", ["down_fwd", "up_fwd", "up_bwd"])
def test_every_gpu_autotune_config_is_correct(gen, monkeypatch, which):
    # each config, not only the one the tuner happens to pick: ragged row and column tiles on purpose
    from contextlib import ExitStack
    module, name, kernel = {"down_fwd": (down, "_configs", down._down_gelu_fwd_kernel),
                            "up_fwd": (up, "_fwd_configs", up._mix_up_fwd_kernel),
                            "up_bwd": (up, "_bwd_configs", up._mix_up_bwd_kernel)}[which]
    configs = gpu_configs(module, name, monkeypatch)
    assert len(configs) > 1
    h, x = (torch.randn(2, 37, 200, generator=gen) for _ in range(2))
    z, a = (torch.randn(2, 37, 128, generator=gen) for _ in range(2))
    w_down, b_down = torch.randn(128, 200, generator=gen) * 200 ** -0.5, torch.randn(128, generator=gen) * 0.1
    w_up, b_up = torch.randn(200, 128, generator=gen) * 128 ** -0.5, torch.randn(200, generator=gen) * 0.1
    for config in configs:
        with ExitStack() as stack:
            stack.enter_context(monkeypatch.context()).setattr(kernel, "configs", [config])
            if which == "down_fwd":
                check(down.down_gelu, HF.down_gelu_ref, [h, w_down, b_down], torch.float32, ["z", "dh", "dW", "db"])
            else:
                check(up.mix_up_residual, HF.mix_up_residual_ref,
                      [z, a, w_up, b_up, torch.tensor(0.6), h, torch.tensor(-0.3), x], torch.float32,
                      ["out", "dz", "da", "dW", "db", "dg_a", "dh", "dg_blk", "dx"])


def test_strided_bias_and_gamma_are_read_by_stride(gen):
    # a bias or LayerScale γ that is a strided view (a slice of a packed parameter) must be read
    # through its stride, not as if it were contiguous
    m, d, r = 13, 40, 24
    h, w = torch.randn(m, d, generator=gen), torch.randn(r, d, generator=gen)
    packed = torch.randn(2 * r, generator=gen)
    z, p = down.down_gelu_forward(h, w, packed[::2])
    assert_close(p, h @ w.t() + packed[::2], **FP32_TOL, name="p")
    w_up, b_up = torch.randn(d, r, generator=gen), torch.randn(3 * d, generator=gen)[::3]
    gamma = torch.randn(2 * d, generator=gen)[1::2]
    gate, hh = torch.tensor(0.3), torch.randn(m, d, generator=gen)
    got = up.mix_up_forward(z, z, w_up, b_up, gate, hh, gate, hh, gamma)
    want = up.mix_up_forward(z, z, w_up, b_up.contiguous(), gate, hh, gate, hh, gamma.contiguous())
    assert torch.equal(got, want)
    assert_close(got, (torch.sigmoid(gate) * (z @ w_up.t() + b_up) + hh) * gamma + hh, **FP32_TOL, name="out")


def test_strided_bias_is_read_by_stride_in_backward(gen):
    # the block gate's gradient needs Σ_n b_n colsum_n: backward read the bias as if contiguous
    # (the forward launcher makes its own contiguous copy, but autograd saves the bias as given),
    # so a bias that is a strided view (a slice of a packed parameter) gave a wrong dg_blk
    m, d, r = 13, 40, 24
    z, a, h, x = (torch.randn(m, w, generator=gen) for w in (r, r, d, d))
    w_up = torch.randn(d, r, generator=gen) * r ** -0.5
    packed = torch.randn(3 * d, generator=gen)
    check(lambda z, a, w, b, g, h, go, x: up.mix_up_residual(z, a, w, b[::3], g, h, go, x),
          lambda z, a, w, b, g, h, go, x: HF.mix_up_residual_ref(z, a, w, b[::3], g, h, go, x),
          [z, a, w_up, packed, torch.tensor(0.6), h, torch.tensor(-0.3), x], torch.float32,
          ["out", "dz", "da", "dW", "db", "dg_a", "dh", "dg_blk", "dx"])


@pytest.mark.parametrize("which", ["up_fwd", "up_bwd"])
def test_autotune_cache_tells_tf32_from_ieee(gen, monkeypatch, which):
    # The mix-up configs are pruned by the fp32 precision (with TF32 allowed, the 128x128 forward
    # tiles and the BLOCK_N=128 backward tiles need more shared memory than an H100 has), but the
    # tuner's cache was keyed on (N, K, dtypes) only: a config picked while fp32 was IEEE was reused
    # after the user allowed TF32, and that launch fails on the GPU (out of shared memory).
    from harma_fast.kernels._common import fp32_matmul
    kernel, name = {"up_fwd": (up._mix_up_fwd_kernel, "_fwd_configs"),
                    "up_bwd": (up._mix_up_bwd_kernel, "_bwd_configs")}[which]
    configs = gpu_configs(up, name, monkeypatch)
    big = lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128 if which == "up_fwd" \
        else c.kwargs["BLOCK_N"] > 64  # noqa: E731  (what each prune drops under TF32)
    assert any(map(big, configs)) and not all(map(big, configs))
    monkeypatch.setattr(kernel, "configs", configs)
    monkeypatch.setattr(kernel, "cache", {})
    # no GPU to time on: the tuner is told the configs TF32 cannot take are the fastest
    monkeypatch.setattr(kernel, "_bench", lambda *args, config, **meta: 1.0 if big(config) else 2.0)
    m, d, r = 5, 24, 16
    z, a = torch.randn(m, r, generator=gen), torch.randn(m, r, generator=gen)
    w, b, g = torch.randn(d, r, generator=gen), torch.randn(d, generator=gen), torch.tensor(0.3)
    h = torch.randn(m, d, generator=gen)
    for tf32 in (False, True):
        with fp32_matmul(tf32):
            if which == "up_fwd":
                up.mix_up_forward(z, a, w, b, g, h, g, h, None)
            else:
                up.mix_up_backward(h, z, a, w, b, g, g)
        assert big(kernel.best_config) != tf32, f"tf32={tf32}: ran {kernel.best_config}"


def test_mix_up_refuses_a_layerscale_of_another_width(gen):
    # γ is read at the output columns: one of another width (a scalar γ, say) was read past its
    # end (out of bounds on a GPU) where the reference broadcasts or raises
    m, d, r = 5, 24, 16
    z, h = torch.randn(m, r, generator=gen), torch.randn(m, d, generator=gen)
    w, b, g = torch.randn(d, r, generator=gen), torch.randn(d, generator=gen), torch.tensor(0.3)
    with pytest.raises(ValueError, match="gamma"):
        up.mix_up_forward(z, z, w, b, g, h, g, h, torch.ones(()))
