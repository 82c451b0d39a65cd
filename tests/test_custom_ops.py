"""The kernels' torch.library ops agree with their fake (meta) implementations.

``torch.compile`` plans memory from the fakes: a fake whose dtype or strides differ from what the
op returns fails Inductor's output asserts, or worse, on the GPU. ``torch.library.opcheck`` runs
each op (through the Triton interpreter here) and its fake on the same inputs and compares
shapes, dtypes and strides — on the layouts training sends and on transposed and mixed-dtype ones.
"""
import pytest
import torch

pytest.importorskip("triton")
from harma_fast.backend import triton_interpreting  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_interpreting() and not torch.cuda.is_available(),
                                reason="needs the Triton interpreter or a GPU")
CHECKS = ("test_schema", "test_faketensor")


def ops():
    from harma_fast.kernels import adapter_attention, adapter_down, adapter_up, similarity_loss  # noqa: F401
    return torch.ops.harma_fast


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("seq_first", [False, True])
def test_attention_ops(seq_first):
    qkv = rand(3, 20, 96)
    qkv = qkv.transpose(0, 1).contiguous().transpose(0, 1) if seq_first else qkv  # a permuted, dense layout
    out, lse = ops().attention_core(qkv, 2, seq_first)
    torch.library.opcheck(ops().attention_core, (qkv, 2, seq_first), test_utils=CHECKS)
    torch.library.opcheck(ops().attention_core_bwd, (rand(*out.shape, seed=1), qkv, out, lse, 2, seq_first),
                          test_utils=CHECKS)


def test_down_gelu_ops():
    h = rand(40, 24)
    w = rand(24, 16, seed=1).t()  # a transposed parameter
    z, p = ops().down_gelu(h, w, rand(16, seed=2))
    torch.library.opcheck(ops().down_gelu, (h, w, rand(16, seed=2)), test_utils=CHECKS)
    torch.library.opcheck(ops().down_gelu_bwd, (rand(40, 16, seed=3), p, h, w), test_utils=CHECKS)


@pytest.mark.parametrize("a_dtype", [torch.float32, torch.bfloat16])
def test_mix_up_ops(a_dtype):
    z, a = rand(30, 16), rand(30, 16, dtype=a_dtype, seed=1)
    w, b, g = rand(24, 16, seed=2), rand(24, seed=3), torch.tensor(0.3)
    h, x = rand(30, 24, dtype=torch.bfloat16, seed=4), rand(30, 24, seed=5)  # fp32 residual, bf16 MLP output
    torch.library.opcheck(ops().mix_up_residual, (z, a, w, b, g, h, g, x, None), test_utils=CHECKS)
    torch.library.opcheck(ops().mix_up_residual_bwd, (rand(30, 24, seed=6), z, a, w, b, g, g), test_utils=CHECKS)


def test_loss_ops():
    image = torch.nn.functional.normalize(rand(12, 32), dim=1)
    text = torch.nn.functional.normalize(rand(32, 12, seed=1), dim=0).t()  # a transposed view
    tau, ids = torch.tensor(0.07), torch.arange(12) // 2
    args = (image, text, tau, ids, 0.2, 2.0, False, 16, 16, 16)
    _, stats, amax = ops().harma_loss_fwd(*args)
    torch.library.opcheck(ops().harma_loss_fwd, args, test_utils=CHECKS)
    torch.library.opcheck(ops().harma_loss_bwd, (torch.ones(2), image, text, tau, ids, stats, amax, 0.2, 2.0, False,
                                                16, 16, 16), test_utils=CHECKS)


def test_loss_op_without_ids_under_a_float64_default_dtype():
    # the pair counts (all ones without ids) were made in the default dtype: under
    # torch.set_default_dtype(torch.float64) the stats came out float64, where the fake says float32
    image = torch.nn.functional.normalize(rand(12, 32), dim=1)
    text = torch.nn.functional.normalize(rand(12, 32, seed=1), dim=1)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        args = (image, text, torch.tensor(0.07, dtype=torch.float32), None, 0.2, 2.0, False, 16, 16, 16)
        _, stats, _ = ops().harma_loss_fwd(*args)
        assert stats.dtype == torch.float32
        torch.library.opcheck(ops().harma_loss_fwd, args, test_utils=CHECKS)
    finally:
        torch.set_default_dtype(saved)


def _colmajor(t):
    """The same values in a column-major (transposed, dense) layout: stride 1 on the rows."""
    return t.t().contiguous().t()


def test_ops_read_any_layout_they_are_given():
    # The launchers behind the registered ops read rows with unit column stride; the Python
    # wrappers hand them such rows, but the ops themselves (torch.ops.harma_fast.*, what
    # torch.compile and export see) took any layout and read a column-major one as row-major.
    z, a = rand(30, 16), rand(30, 16, seed=1)
    w, b, g = rand(24, 16, seed=2), rand(24, seed=3), torch.tensor(0.3)
    h, x = rand(30, 24, seed=4), rand(30, 24, seed=5)
    want = ops().mix_up_residual(z, a, w, b, g, h, g, x, None)
    got = ops().mix_up_residual(_colmajor(z), _colmajor(a), w, b, g, _colmajor(h), g, _colmajor(x), None)
    torch.testing.assert_close(got, want)
    grad = rand(30, 24, seed=6)
    want = ops().mix_up_residual_bwd(grad, z, a, w, b, g, g)
    got = ops().mix_up_residual_bwd(grad, _colmajor(z), _colmajor(a), w, b, g, g)
    for i, (gg, ww) in enumerate(zip(got, want)):
        torch.testing.assert_close(gg, ww, msg=f"mix_up_residual_bwd output {i}")

    h2, wd = rand(40, 24, seed=7), rand(16, 24, seed=8)
    _, p = ops().down_gelu(h2, wd, rand(16, seed=9))
    dz = rand(40, 16, seed=10)
    want = ops().down_gelu_bwd(dz, p, h2, wd)
    got = ops().down_gelu_bwd(_colmajor(dz), _colmajor(p), h2, wd)
    for i, (gg, ww) in enumerate(zip(got, want)):
        torch.testing.assert_close(gg, ww, msg=f"down_gelu_bwd output {i}")

    image = torch.nn.functional.normalize(rand(12, 32), dim=1)
    text = torch.nn.functional.normalize(rand(12, 32, seed=1), dim=1)
    tau, ids = torch.tensor(0.07), torch.arange(12) // 2
    strided_ids = torch.stack([ids, -ids - 1], 1)[:, 0]  # the same ids with stride 2
    want = ops().harma_loss_fwd(image, text, tau, ids, 0.2, 2.0, False, 16, 16, 16)
    got = ops().harma_loss_fwd(image, text, tau, strided_ids, 0.2, 2.0, False, 16, 16, 16)
    for i, (gg, ww) in enumerate(zip(got, want)):
        torch.testing.assert_close(gg, ww, msg=f"harma_loss_fwd output {i}")
    _, stats, amax = want
    want = ops().harma_loss_bwd(torch.ones(2), image, text, tau, ids, stats, amax, 0.2, 2.0, False, 16, 16, 16)
    got = ops().harma_loss_bwd(torch.ones(2), image, text, tau, strided_ids, stats, amax, 0.2, 2.0, False,
                               16, 16, 16)
    for i, (gg, ww) in enumerate(zip(got, want)):
        torch.testing.assert_close(gg, ww, msg=f"harma_loss_bwd output {i}")


def test_backward_ops_read_saved_tensors_of_any_layout():
    # the backward ops read what forward saved (stats, amax; out, lse) as if dense: from the
    # forward ops they are, but the ops take any layout and read another one wrongly
    image = torch.nn.functional.normalize(rand(12, 32), dim=1)
    text = torch.nn.functional.normalize(rand(12, 32, seed=1), dim=1)
    tau, ids = torch.tensor(0.07), torch.arange(12) // 2
    _, stats, amax = ops().harma_loss_fwd(image, text, tau, ids, 0.2, 2.0, True, 16, 16, 16)
    want = ops().harma_loss_bwd(torch.ones(2), image, text, tau, ids, stats, amax, 0.2, 2.0, True, 16, 16, 16)
    got = ops().harma_loss_bwd(torch.ones(2), image, text, tau, ids, _colmajor(stats), _colmajor(amax), 0.2, 2.0,
                               True, 16, 16, 16)
    for i, (gg, ww) in enumerate(zip(got, want)):
        torch.testing.assert_close(gg, ww, msg=f"harma_loss_bwd output {i}")

    def permuted(t):  # same values, last dimension no longer unit-stride
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    qkv, dout = rand(3, 20, 96), rand(3, 20, 32, seed=1)
    out, lse = ops().attention_core(qkv, 2, False)
    want = ops().attention_core_bwd(dout, qkv, out, lse, 2, False)
    got = ops().attention_core_bwd(dout, qkv, permuted(out), permuted(lse), 2, False)
    torch.testing.assert_close(got, want)
