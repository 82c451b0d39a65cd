import math

import pytest
import torch
import torch.nn.functional as F

import harma_fast
from harma_fast.losses import harma_loss_ref
from helpers import assert_close, assert_within_torch_error

kernels = pytest.importorskip("harma_fast.kernels.similarity_loss")


def features(b, d, gen, dtype=torch.float32, noise=0.8):
    i = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    t = F.normalize(i + noise * torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    return i.to(dtype), t.to(dtype)


def loop_loss(i, t, tau, ids, margin, gamma, max_violation):
    """DESIGN §2 with plain Python loops in float64: the independent spec check."""
    b = len(i)
    s = [[sum(i[a][k] * t[c][k] for k in range(len(i[a]))) for c in range(b)] for a in range(b)]
    ids = list(range(b)) if ids is None else ids
    same = [[ids[a] == ids[c] for c in range(b)] for a in range(b)]
    rows = cols = 0.0
    for a in range(b):
        lse = math.log(sum(math.exp(s[a][c] / tau) for c in range(b)))
        n = sum(same[a])
        rows += -sum((same[a][c] / n) * (s[a][c] / tau - lse) for c in range(b))
    for c in range(b):
        lse = math.log(sum(math.exp(s[a][c] / tau) for a in range(b)))
        n = sum(same[a][c] for a in range(b))
        cols += -sum((same[a][c] / n) * (s[a][c] / tau - lse) for a in range(b))
    contrastive = (rows / b + cols / b) / 2

    def f(c):
        return (1 - math.exp(-c)) ** gamma * c
    cs = [[f(max(0.0, margin + s[a][c] - s[a][a])) if a != c else 0.0 for c in range(b)] for a in range(b)]
    cim = [[f(max(0.0, margin + s[a][c] - s[c][c])) if a != c else 0.0 for c in range(b)] for a in range(b)]
    if max_violation:
        trip = (sum(max(row) for row in cs) + sum(max(cim[a][c] for a in range(b)) for c in range(b))) / 2
    else:
        trip = (sum(map(sum, cs)) + sum(map(sum, cim))) / 2
    return contrastive + trip, contrastive, trip


@pytest.mark.parametrize("with_ids", [False, True])
@pytest.mark.parametrize("max_violation", [False, True])
def test_reference_equals_the_formulas_in_float64(gen, with_ids, max_violation):
    i, t = features(7, 5, gen, torch.float64, noise=1.5)
    ids = torch.tensor([0, 1, 1, 2, 0, 3, 1]) if with_ids else None
    got = harma_loss_ref(i, t, torch.tensor(0.07, dtype=torch.float64), ids, 0.2, 2.0, max_violation)
    want = loop_loss(i.tolist(), t.tolist(), 0.07, ids.tolist() if with_ids else None, 0.2, 2.0, max_violation)
    for g, w in zip(got, want, strict=True):
        assert g.item() == pytest.approx(w, rel=1e-12, abs=1e-12)
    assert want[2] > 0  # the triplet term is active on this data


def _run(fn, i, t, tau, ids, max_violation, upstream, **kw):
    i, t, tau = (x.detach().clone().requires_grad_() for x in (i, t, tau))
    out = fn(i, t, tau, ids, 0.2, 2.0, max_violation, **kw)
    (sum(o * u for o, u in zip(out, upstream, strict=True))).backward()
    return [o.detach() for o in out], i.grad, t.grad, tau.grad


CASES = [  # (B, D, blocks (BLOCK_M, BLOCK_N, BLOCK_K)) - ragged last tiles on purpose
    (1, 24, (16, 16, 16)),
    (5, 64, (16, 16, 32)),
    (37, 24, (16, 32, 16)),
    (70, 512, (64, 32, 64)),
    (130, 64, (32, 64, 16)),
    (130, 512, (64, 64, 64)),
]


@pytest.mark.interpreter
@pytest.mark.parametrize("b, d, blocks", CASES)
@pytest.mark.parametrize("ids_kind", ["none", "repeated"])
def test_triton_loss_equals_reference_fp32(gen, b, d, blocks, ids_kind):
    i, t = features(b, d, gen)
    ids = torch.randint(0, max(1, b // 3), (b,), generator=gen) if ids_kind == "repeated" else None
    tau = torch.tensor(0.05)
    upstream = torch.randn(3, generator=gen)
    for max_violation in (False, True) if b in (37, 130) else (False,):
        ref = _run(harma_loss_ref, i.double(), t.double(), tau.double(), ids, max_violation, upstream.double())
        got = _run(kernels.harma_loss, i, t, tau, ids, max_violation, upstream, blocks=blocks)
        for name, g, r in zip(("total", "contrastive", "triplet"), got[0], ref[0], strict=True):
            assert_close(g, r, atol=2e-5, rtol=2e-5, name=f"{name} mv={max_violation}")
        assert_close(got[1], ref[1], atol=2e-6, rtol=1e-4, name="d_image")
        assert_close(got[2], ref[2], atol=2e-6, rtol=1e-4, name="d_text")
        assert_close(got[3], ref[3], atol=1e-4, rtol=1e-4, name="d_tau")


@pytest.mark.interpreter
@pytest.mark.parametrize("b, d, blocks", [(37, 64, (16, 16, 32)), (130, 512, (64, 32, 64))])
def test_triton_loss_bf16_within_torch_bf16_error(gen, b, d, blocks):
    i, t = features(b, d, gen)
    ids = torch.randint(0, b // 2, (b,), generator=gen)
    tau, upstream = torch.tensor(0.07), torch.tensor([1.0, 0.0, 0.0])
    ref = _run(harma_loss_ref, i.double(), t.double(), tau.double(), ids, False, upstream.double())
    ib, tb = i.bfloat16(), t.bfloat16()

    def torch_bf16(i, t, tau, ids, margin, gamma, mv):  # torch computing the same loss in bf16 throughout
        s = (i @ t.t())
        same = ids[:, None] == ids[None, :]
        p = same.to(s.dtype) / same.sum(1, keepdim=True).to(s.dtype)
        logits = s / tau.to(s.dtype)
        c = -((p * logits.log_softmax(1)).sum(1).mean() + (p * logits.log_softmax(0)).sum(0).mean()) / 2
        eye = torch.eye(len(s), dtype=torch.bool)
        d_ = s.diagonal()
        f = harma_fast.losses.focal_cost
        tr = (f((margin + s - d_[:, None]).clamp(min=0), gamma).masked_fill(eye, 0).sum()
              + f((margin + s - d_[None, :]).clamp(min=0), gamma).masked_fill(eye, 0).sum()) / 2
        return c + tr, c, tr
    base = _run(torch_bf16, ib, tb, tau, ids, False, upstream)
    got = _run(kernels.harma_loss, ib, tb, tau, ids, False, upstream, blocks=blocks)
    assert got[1].dtype == torch.bfloat16
    for k, name in ((0, "losses"), (1, "d_image"), (2, "d_text")):
        g, bt, r = (torch.stack(x[k]) if k == 0 else x[k] for x in (got, base, ref))
        assert_within_torch_error(g, bt, r, atol=1e-5, name=name)


def test_loss_module_reference_path_and_temperature(gen):
    loss = harma_fast.HarMALoss()
    assert loss.temperature.item() == pytest.approx(0.07) and loss.temperature.requires_grad
    i, t = features(6, 16, gen)
    out = loss(i, t, torch.tensor([0, 0, 1, 2, 3, 3]))
    assert torch.allclose(out.total, out.contrastive + out.triplet)
    out.total.backward()
    assert loss.temperature.grad is not None
    frozen = harma_fast.HarMALoss(learn_temperature=False, temperature=0.1)
    assert not frozen.temperature.requires_grad


@pytest.mark.interpreter
def test_loss_module_triton_backend_matches_reference(gen):
    i, t = features(21, 32, gen)
    ids = torch.randint(0, 7, (21,), generator=gen)
    ref = harma_fast.HarMALoss(backend="reference")(i, t, ids)
    fused = harma_fast.HarMALoss(backend="triton")(i, t, ids)
    for a, b in zip(fused, ref, strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_loss_input_errors(gen):
    loss = harma_fast.HarMALoss()
    i, t = features(4, 8, gen)
    with pytest.raises(ValueError, match=r"same shape \(B, D\); got \(4, 8\) and \(3, 8\)"):
        loss(i, t[:3])
    with pytest.raises(ValueError, match=r"image_ids must have shape \(4,\)"):
        loss(i, t, torch.zeros(5))
    bad = i.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"image_features has NaN/Inf values \(rows \[2\]\)"):
        loss(bad, t)
    with pytest.raises(ValueError, match="empty batch"):
        loss(i[:0], t[:0])
    with pytest.raises(ValueError, match="temperature > 0"):
        harma_fast.HarMALoss(temperature=0)


def test_starting_temperature_outside_its_range_is_refused(gen):
    from harma_fast.errors import ConfigError
    from harma_fast.losses import TEMPERATURE_RANGE
    assert TEMPERATURE_RANGE == (0.001, 0.5)
    # the forward clamps τ into temperature_range: started outside, it would compute with the
    # bound while loss.temperature still read the value given
    with pytest.raises(ConfigError, match=r"temperature 1.0 is outside \[0.001, 0.5\], its temperature_range.*"
                                          r"compute with 0.5; pass"):
        harma_fast.HarMALoss(temperature=1.0)
    with pytest.raises(ConfigError, match=r"temperature 0.0001 is outside \[0.01, 2.0\]"):
        harma_fast.HarMALoss(temperature=1e-4, temperature_range=(0.01, 2.0), learn_temperature=False)
    with pytest.raises(ConfigError, match=r"0 < low <= high, got \(0.5, 0.1\)"):
        harma_fast.HarMALoss(temperature=0.2, temperature_range=(0.5, 0.1))
    # inside, on a bound included, it is used as given and learns
    i, t = features(6, 16, gen)
    for tau, tau_range in ((0.5, TEMPERATURE_RANGE), (0.001, TEMPERATURE_RANGE), (1.0, (0.01, 2.0))):
        loss = harma_fast.HarMALoss(temperature=tau, temperature_range=tau_range, backend="reference")
        out = loss(i, t)
        want = harma_loss_ref(i.double(), t.double(), torch.tensor(tau, dtype=torch.float64))
        assert_close(out.total, want.total, atol=1e-5, rtol=1e-5, name=f"loss at tau {tau}")
        out.total.backward()
        assert loss.temperature.grad.abs() > 0, f"tau {tau}: no gradient"


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_temperature_pushed_past_its_range_computes_with_the_bound_and_comes_back(gen, backend):
    # torch's clamp passes no gradient at or past a bound: τ stepped onto 0.5 stayed there for good
    i, t = features(6, 16, gen)
    loss = harma_fast.HarMALoss(temperature=0.4, backend=backend)
    with torch.no_grad():
        loss.temperature.fill_(0.7)  # where an optimizer step took it
    out = loss(i, t)
    want = harma_loss_ref(i.double(), t.double(), torch.tensor(0.5, dtype=torch.float64))
    assert_close(out.total, want.total, atol=1e-4, rtol=1e-4, name="loss at the bound")
    out.total.backward()
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    harma_loss_ref(i.double(), t.double(), tau).total.backward()
    assert_close(loss.temperature.grad, tau.grad, atol=1e-4, rtol=1e-3, name="gradient at the bound")
    loss.clamp_temperature_()
    assert loss.temperature.item() == 0.5


def test_image_ids_may_be_a_list_or_array(gen):
    import numpy as np
    loss = harma_fast.HarMALoss(backend="reference")
    i, t = features(4, 8, gen)
    want = loss(i, t, torch.tensor([0, 0, 1, 1]))
    for ids in ([0, 0, 1, 1], (0, 0, 1, 1), np.array([0, 0, 1, 1])):
        got = loss(i, t, ids)
        for a, b in zip(got, want, strict=True):
            assert_close(a, b, atol=0, name=type(ids).__name__)
    with pytest.raises(ValueError, match=r"image_ids must have shape \(4,\)"):
        loss(i, t, [0, 1, 2])
    with pytest.raises(TypeError, match="image_ids must be a tensor, list or array of image ids .* got list"):
        loss(i, t, ["a", "b", "c", "d"])


@pytest.mark.interpreter
def test_compiled_loss_has_no_graph_break(gen):
    import torch._dynamo
    i, t = features(9, 16, gen)

    def step(i, t):
        return kernels.harma_loss(i, t, torch.tensor(0.07), None)[0] * 2
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(step)(i, t)
    assert explanation.graph_break_count == 0


def tiny_cost_features():
    """Features whose triplet costs include c = 2^-40 exactly (fp32 1 − e^{−c} is 0 there), besides ordinary ones.

    Every score is a short sum of products of powers of two, so fp32 and float64 agree on c exactly.
    """
    s = 2.0 ** -10
    i = torch.tensor([[s, 0, 0, 0], [0, s, 0, 0], [0.25, 0.5, -0.25, 0.5]])
    t = torch.tensor([[s, 0, 0, 0], [2.0 ** -30, s, 0, 0], [0.5, -0.25, 0.5, 0.25]])
    return i, t, 2.0 ** -20  # margin: m + S_01 − S_00 = m + S_01 − S_11 = 2^-40


@pytest.mark.interpreter
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("max_violation", [False, True])
def test_triton_loss_focal_exponents_and_tiny_costs(gamma, max_violation):
    # γ ≤ 1 used to give NaN: w^{γ−1} of w = 1 − e^{−c} = 0 for 0 < c ≲ 3e-8
    i, t, margin = tiny_cost_features()
    tau, upstream = torch.tensor(0.5), torch.tensor([0.3, 0.7, 1.1])

    def run(fn, i, t, tau, **kw):
        i, t, tau = (x.detach().clone().requires_grad_() for x in (i, t, tau))
        out = fn(i, t, tau, None, margin, gamma, max_violation, **kw)
        sum(o * u for o, u in zip(out, upstream.to(i.dtype), strict=True)).backward()
        return [o.detach() for o in out] + [i.grad, t.grad, tau.grad]
    ref = run(harma_loss_ref, i.double(), t.double(), tau.double())
    got = run(kernels.harma_loss, i, t, tau, blocks=(16, 16, 16))
    assert ref[2] > 0  # the triplet term is active
    for name, g, r in zip(("total", "contrastive", "triplet", "d_image", "d_text", "d_tau"), got, ref, strict=True):
        assert_close(g, r, atol=2e-6, rtol=1e-5, name=f"{name} gamma={gamma}")


@pytest.fixture
def restore_matmul_precision():
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, "fp32_precision", None)
    legacy = None if saved is not None else matmul.allow_tf32
    yield matmul
    if saved is not None:
        matmul.fp32_precision = saved
    else:
        matmul.allow_tf32 = legacy


@pytest.mark.interpreter
def test_fp32_launch_under_the_new_tf32_api(gen, restore_matmul_precision):
    # torch >= 2.9: reading the legacy allow_tf32 after fp32_precision = "tf32" raises
    from harma_fast.kernels._common import dot_precision
    matmul = restore_matmul_precision
    if not hasattr(matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision API")
    matmul.fp32_precision = "tf32"
    assert dot_precision(torch.float32) == "tf32"
    i, t = features(9, 16, gen)
    total, _, _ = kernels.harma_loss(i, t, torch.tensor(0.07), None)
    assert torch.isfinite(total)
    matmul.fp32_precision = "ieee"
    assert dot_precision(torch.float32) == "ieee" and dot_precision(torch.bfloat16) == "tf32"
    torch.set_float32_matmul_precision("high")  # the older switch, set through its own setter
    assert dot_precision(torch.float32) == "tf32"


@pytest.mark.interpreter
def test_triton_loss_promotes_mixed_dtypes(gen):
    # an fp32 image tower beside a bf16 text tower: tl.dot takes one dtype, so the launcher
    # promotes as `image @ text.T` would; the bf16 side's gradient comes back in bf16
    i, t = features(37, 24, gen)
    t16 = t.bfloat16()
    tau, upstream = torch.tensor(0.05), torch.randn(3, generator=gen)
    got = _run(kernels.harma_loss, i, t16, tau, None, False, upstream, blocks=(16, 16, 16))
    want = _run(kernels.harma_loss, i, t16.float(), tau, None, False, upstream, blocks=(16, 16, 16))
    ref = _run(harma_loss_ref, i.double(), t16.double(), tau.double(), None, False, upstream.double())
    for g, w, r in zip(got[0], want[0], ref[0], strict=True):
        assert_close(g, w, atol=1e-6, rtol=1e-6)
        assert_close(g, r, atol=2e-5, rtol=2e-5)
    assert got[1].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    assert_close(got[1], want[1], atol=1e-6, rtol=1e-6, name="d_image")
    assert torch.equal(got[2], want[2].bfloat16())


def test_reference_loss_under_autocast_computes_in_float32(gen):
    # a user's loop calls the loss inside its autocast region: the reference (the spec, and the
    # CPU path) ran I Tᵀ in bf16 there (loss 2.6e-3 off on B=32), while the fused loss stays fp32
    i, t = features(32, 64, gen, noise=1.5)
    loss = harma_fast.HarMALoss(backend="reference")
    want = loss(i, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(i, t)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float32
        assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_image_ids_that_are_not_integers_are_refused(gen):
    # a bool mask made two classes of the whole batch; float ids past 2**24 merge images
    loss = harma_fast.HarMALoss(backend="reference")
    i, t = features(4, 8, gen)
    for ids in (torch.tensor([True, False, True, False]), torch.tensor([0.0, 1.0, 1.0, 2.0]), [0.5, 1.0, 1.0, 2.0]):
        with pytest.raises(TypeError, match=r"image_ids must be integers .* got dtype torch\.(bool|float32|float64)"):
            loss(i, t, ids)
    for dtype in (torch.int32, torch.int64, torch.uint8):
        loss(i, t, torch.tensor([0, 1, 1, 2], dtype=dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_image_ids_left_on_the_cpu_meet_features_on_the_gpu(gen):
    # the reference path built its positive mask on the ids' device: CPU ids, CUDA features raised
    i, t = features(6, 16, gen)
    ids = torch.tensor([0, 1, 1, 2, 3, 3])
    want = harma_fast.HarMALoss(backend="reference")(i, t, ids)
    for backend in ("reference", "auto"):
        got = harma_fast.HarMALoss(backend=backend).cuda()(i.cuda(), t.cuda(), ids)
        assert_close(got.total, want.total, atol=1e-5, rtol=1e-5, name=backend)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_integer_features_are_refused(gen, backend):
    # the Triton path met them in tl.dot (a deep interpreter/compiler error)
    i, t = features(4, 8, gen)
    with pytest.raises(TypeError, match="floating-point features, got torch.int64 and torch.float32"):
        harma_fast.HarMALoss(backend=backend)((i * 10).long(), t)
