"""Fused ONNX graphs (one com.microsoft.Attention per attention), int8 graphs, and how the runtime loads them."""
import json
import sys

import numpy as np
import pytest
import torch

import harma_fast
from harma_fast.cli import main
from helpers import assert_close, randomize_adapters, tiny_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from harma_fast.errors import HarmaError  # noqa: E402
from harma_fast.export import ExportParityError, OrtEncoder, export_onnx  # noqa: E402
from harma_fast.export import fuse, quantize  # noqa: E402
from harma_fast.functional import attention_core_ref  # noqa: E402


def make_model(graph, *domains):
    """A hand-built graph of opset 17 (and ``domains``, version 1) at IR version 8, which opset 17
    came with: onnx 1.23 writes IR 14 by default, which ONNX Runtime 1.30 refuses to load."""
    from onnx import helper
    return helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17)]
                             + [helper.make_opsetid(domain, 1) for domain in domains])


def patched_tiny(seed=2):
    return randomize_adapters(harma_fast.patch(tiny_model()), seed=seed)


@pytest.fixture(scope="module")
def fused_export(tmp_path_factory):
    model = patched_tiny()
    out = tmp_path_factory.mktemp("fused")
    return model, out, export_onnx(model, out, model_name="HarMA-Tiny")


def nodes(path, op_type, domain=None):
    graph = onnx.load(str(path)).graph
    return [n for n in graph.node if n.op_type == op_type and (domain is None or n.domain == domain)]


def attention_calls(model, tower):
    """Attention calls per forward: the backbone's, the adapter's (applied twice) and S's."""
    blocks = harma_fast.patching.find_towers(model)[tower].blocks
    return sum(1 + 2 + (b.harma.shared_module is not None) for b in blocks)


# -- the op ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n, length, c, heads", [(3, 17, 96, 2), (1, 5, 24, 3), (2, 50, 64, 8)])
def test_attention_op_is_the_reference_formula(gen, n, length, c, heads):
    x = torch.randn(n, length, c, generator=gen, dtype=torch.float64)
    w = torch.randn(3 * c, c, generator=gen, dtype=torch.float64) / c ** 0.5
    b = torch.randn(3 * c, generator=gen, dtype=torch.float64)
    got = fuse.attention(x, w.t().contiguous(), b, heads, False)
    assert_close(got, attention_core_ref(torch.nn.functional.linear(x, w, b), heads), atol=1e-12, name="unmasked")


def test_causal_attention_op_matches_multihead_attention_with_the_causal_mask(gen):
    mha = torch.nn.MultiheadAttention(40, 4, batch_first=True, dtype=torch.float64).eval()
    x = torch.randn(3, 11, 40, generator=gen, dtype=torch.float64)
    mask = torch.full((11, 11), float("-inf"), dtype=torch.float64).triu(1)
    want = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    core = fuse.attention(x, mha.in_proj_weight.t().contiguous(), mha.in_proj_bias, 4, True)
    assert_close(mha.out_proj(core), want, atol=1e-12, name="causal")
    assert fuse._is_causal_mask(mask) and not fuse._is_causal_mask(mask.t()) and not fuse._is_causal_mask(None)


def test_fold_initializer_transposes():
    from onnx import TensorProto, helper, numpy_helper
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], [numpy_helper.from_array(w, "w")])
    model = make_model(graph)
    assert fuse.fold_initializer_transposes(model) == 1
    assert [n.op_type for n in model.graph.node] == ["MatMul"]
    (init,) = model.graph.initializer
    assert init.name == "wt" and np.array_equal(numpy_helper.to_array(init), w.T)
    x = np.ones((2, 4), np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert np.allclose(sess.run(None, {"x": x})[0], x @ w.T)


# -- fused fp32 graphs -----------------------------------------------------------------------
@pytest.mark.parametrize("tower", ["image", "text"])
def test_every_attention_is_one_fused_node_with_the_packed_weight(fused_export, tower):
    model, out, meta = fused_export
    path = out / f"{tower}.onnx"
    fused_nodes = nodes(path, "Attention", "com.microsoft")
    assert len(fused_nodes) == attention_calls(model, tower)
    assert not nodes(path, "Softmax"), "an attention was left unfused"
    unidirectional = [next((a.i for a in n.attribute if a.name == "unidirectional"), 0) for n in fused_nodes]
    assert sum(unidirectional) == (len(harma_fast.patching.find_towers(model)[tower].blocks) if tower == "text" else 0)
    # the packed weight is in_proj_weightᵀ, stored as is: no Transpose of any initializer at run time
    graph = onnx.load(str(path)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    block = harma_fast.patching.find_towers(model)[tower].blocks[0]
    assert any(np.array_equal(inits.get(n.input[1]), block.attn.in_proj_weight.detach().numpy().T)
               for n in fused_nodes), "no fused node carries the first block's in_proj_weightᵀ"
    assert meta["attention"] == "fused" and all(r["ok"] for r in meta["parity"][tower])


def test_plain_export_uses_standard_ops_and_prefolded_weights(tmp_path):
    model = patched_tiny()
    export_onnx(model, tmp_path, towers=("text",), fused=False, model_name="HarMA-Tiny")
    graph = onnx.load(str(tmp_path / "text.onnx")).graph
    assert {n.domain for n in graph.node} <= {"", "ai.onnx"} and not onnx.load(str(tmp_path / "text.onnx")).functions
    inits = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert json.loads((tmp_path / "harma.json").read_text())["attention"] == "plain"


def test_fused_export_leaves_the_model_untouched(fused_export):
    model, _, _ = fused_export
    assert all(type(m) is torch.nn.MultiheadAttention for m in model.modules()
               if isinstance(m, torch.nn.MultiheadAttention))
    assert not any(isinstance(m, fuse.FusedAdapterAttention) for m in model.modules())


# -- int8 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_eval(tmp_path_factory):
    from harma_fast.data.synthetic import generate
    return generate(tmp_path_factory.mktemp("synthetic"), n_train=0, n_val=0, n_test=12, image_size=64)


def test_int8_export_quantizes_weights(tmp_path):
    model = patched_tiny()
    meta = export_onnx(model, tmp_path, dtype="int8", model_name="HarMA-Tiny")
    assert meta["dtype"] == "int8" and all(r["ok"] for rows in meta["parity"].values() for r in rows)
    image = tmp_path / "image.onnx"
    assert nodes(image, "QAttention", "com.microsoft") and nodes(image, "MatMulInteger")
    assert not nodes(image, "Attention", "com.microsoft") and not nodes(image, "ConvInteger")
    assert nodes(image, "Conv"), "the patch Conv stays fp32"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "scratch graphs left behind"
    encoder = OrtEncoder(tmp_path)
    assert encoder.providers == ["CPUExecutionProvider"]
    pixels = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    assert ((encoder.encode_pixels(pixels) * want).sum(1) >= quantize.MIN_COSINE).all()


@pytest.mark.slow
def test_int8_keeps_the_demo_models_retrieval(trained_demo, tmp_path, capsys):
    run, data = f"{trained_demo['output_dir']}/run", f"{trained_demo['output_dir']}/data"
    assert main(["export", "--model", "HarMA-Tiny", "--pretrained", f"{run}/backbone.pt", "--adapters",
                 f"{run}/best.safetensors", "--out", str(tmp_path), "--dtype", "int8",
                 "--check-file", f"{data}/test.json", "--image-root", f"{data}/images"]) == 0
    check = json.loads((tmp_path / "harma.json").read_text())["retrieval_check"]
    assert "retrieval on" in capsys.readouterr().out
    with capsys.disabled():  # the figure the issue asks for, in the test log
        print(f"\ndemo model, test mR through the graphs: fp32 {check['fp32']['r_mean']:.2f}, "
              f"int8 {check['int8']['r_mean']:.2f}", file=sys.stderr)
    assert check["ok"] and abs(check["int8"]["r_mean"] - check["fp32"]["r_mean"]) <= quantize.MEAN_RECALL_TOLERANCE


def test_int8_that_changes_retrieval_is_refused_and_removed(tmp_path, synthetic_eval, monkeypatch):
    monkeypatch.setattr(quantize, "recall_failures", lambda *a: ["img_r1 10.00 vs fp32 50.00 (allowed ±2.0)"])
    with pytest.raises(ExportParityError, match="changes retrieval on .*img_r1 10.00 vs fp32 50.00.*No file was written"):
        export_onnx(patched_tiny(), tmp_path, dtype="int8", model_name="HarMA-Tiny", check=False,
                    check_file=synthetic_eval["test"], image_root=synthetic_eval["image_root"])
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("causal", [0, 1])
def test_quantized_attention_stays_close_to_fp32(tmp_path, causal):
    """One fused attention node, quantized: within 5% of its fp32 output (per-channel weight
    scales, which ONNX Runtime's QAttention misreads, give 11-13%)."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    c, length = 64, 12
    weight = (rng.standard_normal((c, 3 * c)) / 8).astype(np.float32)
    node = helper.make_node("Attention", ["x", "w", "b"], ["y"], domain="com.microsoft", num_heads=2,
                            unidirectional=causal)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, length, c])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, length, c])],
                              [numpy_helper.from_array(weight, "w"),
                               numpy_helper.from_array(np.zeros(3 * c, np.float32), "b")])
    onnx.save(make_model(graph, "com.microsoft"), tmp_path / "a.onnx")
    quantize.quantize_tower(tmp_path / "a.onnx", tmp_path / "q.onnx")
    assert nodes(tmp_path / "q.onnx", "QAttention", "com.microsoft")
    x = {"x": rng.standard_normal((1, length, c)).astype(np.float32)}
    want, got = (ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(None, x)[0]
                 for f in ("a.onnx", "q.onnx"))
    assert np.abs(got - want).max() <= 0.05 * np.abs(want).max()


def test_quantized_matmul_does_not_saturate_on_any_cpu(tmp_path):
    """Non-negative activations near the top of uint8 times large weights: on a CPU without VNNI
    ONNX Runtime adds pairs of u8×s8 products in int16, which overflows for 8-bit weights
    (255·127·2 > 32767); weights in 7 bits (reduce_range) cannot overflow there."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    k, n = 256, 64
    weight = rng.choice([-1.0, 1.0], size=(k, n)).astype(np.float32) * rng.uniform(0.9, 1.0, (k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, n])],
                              [numpy_helper.from_array(weight, "w")])
    onnx.save(make_model(graph), tmp_path / "a.onnx")
    quantize.quantize_tower(tmp_path / "a.onnx", tmp_path / "q.onnx")
    q = onnx.load(str(tmp_path / "q.onnx")).graph
    ints = [numpy_helper.to_array(t) for t in q.initializer if t.data_type == TensorProto.INT8]
    assert ints and max(np.abs(w).max() for w in ints) <= 64  # 7-bit weights, whatever the CPU
    x = {"x": rng.uniform(0.8, 1.0, (8, k)).astype(np.float32)}  # quantized near 255
    x["x"][:, 0] = 0.0  # the zero point at 0: the range is [0, 1]
    want = x["x"] @ weight
    got = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()


def test_recall_tolerances():
    fp32 = {"txt_r1": 50.0, "txt_r5": 80.0, "txt_r10": 90.0, "img_r1": 40.0, "img_r5": 70.0, "img_r10": 85.0,
            "r_mean": 69.17}
    assert quantize.recall_failures(fp32, dict(fp32), 500, 2500) == []
    worse = dict(fp32, img_r1=37.5, r_mean=68.75)
    assert quantize.recall_failures(fp32, worse, 500, 2500) == ["img_r1 37.50 vs fp32 40.00 (allowed -2.0)"]
    assert len(quantize.recall_failures(fp32, dict(fp32, r_mean=67.9), 500, 2500)) == 1
    assert len(quantize.recall_failures(fp32, dict(fp32, r_mean=70.5), 500, 2500)) == 1  # mR: either way
    # a single recall is judged one-sided: int8 scoring higher is not a regression
    assert quantize.recall_failures(fp32, dict(fp32, txt_r5=85.0, r_mean=69.9), 100, 500) == []
    # on 20 images one query is 5 points of image->text recall: a one-query flip is allowed
    assert quantize.recall_failures(fp32, dict(fp32, txt_r1=45.0), 20, 100) == []
    assert len(quantize.recall_failures(fp32, dict(fp32, txt_r1=40.0), 20, 100)) == 1


def test_int8_option_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(HarmaError, match="int8.*fused"):
        export_onnx(model, tmp_path, dtype="int8", fused=False)
    with pytest.raises(HarmaError, match="check_file.*needs dtype='int8'"):
        export_onnx(model, tmp_path, check_file="x.json", image_root=".")


# -- runtime ---------------------------------------------------------------------------------
def test_fp16_runs_at_full_optimisation_without_the_nchwc_pass(tmp_path):
    model = patched_tiny()
    export_onnx(model, tmp_path, towers=("image",), dtype="fp16", model_name="HarMA-Tiny")
    encoder = OrtEncoder(tmp_path, providers=["CPUExecutionProvider"])
    options = encoder._session("image").get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry("optimization.disable_specified_optimizers") == "NchwcTransformer"
    pixels = np.random.default_rng(1).standard_normal((3, 3, 64, 64)).astype(np.float32)
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    assert np.abs(encoder.encode_pixels(pixels) - want).max() <= 2e-2


def test_session_plan_per_dtype():
    from harma_fast.export.runtime import default_providers, session_options
    assert default_providers("int8") == ["CPUExecutionProvider"]
    assert default_providers("fp16")[-1] == "CPUExecutionProvider"
    for dtype in ("fp32", "int8"):
        options = session_options(dtype)
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with pytest.raises(RuntimeError, match="does not have configuration"):  # no pass disabled
            options.get_session_config_entry("optimization.disable_specified_optimizers")
    # fp16 without the crashing CPU pass even when planned for CUDA: a CUDA provider that fails at
    # session creation falls back to the CPU one with these options
    options = session_options("fp16")
    assert options.get_session_config_entry("optimization.disable_specified_optimizers") == "NchwcTransformer"


def test_truncated_graph_is_a_clear_error(fused_export, tmp_path):
    _, out, _ = fused_export
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("harma.json", "image.onnx", "text.onnx", "bpe_simple_vocab_16e6.txt.gz"):
        (broken / name).write_bytes((out / name).read_bytes())
    data = (broken / "text.onnx").read_bytes()
    (broken / "text.onnx").write_bytes(data[: len(data) // 3])
    encoder = OrtEncoder(broken)
    with pytest.raises(HarmaError, match=r"text\.onnx is not a loadable ONNX graph .*re-export it"):
        encoder.encode_texts(["a lake"])
    (broken / "image.onnx").write_bytes(b"")
    with pytest.raises(HarmaError, match=r"image\.onnx .*re-export"):
        encoder.encode_pixels(np.zeros((1, 3, 64, 64), np.float32))


ORT_1_30_EMPTY_FILE = ("[ONNXRuntimeError] : 1 : FAIL : Load model from {path} failed:/onnxruntime_src/onnxruntime/"
                       "core/graph/model.cc:187 onnxruntime::Model::Model(onnx::ModelProto&&, const onnxruntime::"
                       "PathString&, const onnxruntime::IOnnxRuntimeOpSchemaRegistryList*, const onnxruntime::logging::"
                       "Logger&, const onnxruntime::ModelOptions&) ModelProto does not have a graph.\n")


def test_an_empty_graph_is_called_truncated_with_onnx_runtime_1_30s_message_too(tmp_path, monkeypatch):
    # ONNX Runtime 1.30 fails an empty file with FAIL (1.32: INVALID_ARGUMENT) and a C++ signature
    # before the reason, which a 300-character cut lost; the file was blamed on contrib ops
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    from harma_fast.export.runtime import open_session
    path = tmp_path / "image.onnx"
    path.write_bytes(b"")

    def session(*args, **kwargs):
        raise C.Fail(ORT_1_30_EMPTY_FILE.format(path=path))
    monkeypatch.setattr(ort, "InferenceSession", session)
    with pytest.raises(HarmaError, match=r"image\.onnx is not a loadable ONNX graph .*re-export it") as info:
        open_session(path, ort.SessionOptions(), ["CPUExecutionProvider"])
    assert "failed: ModelProto does not have a graph." in str(info.value) and "onnxruntime::" not in str(info.value)


def test_reexporting_one_tower_removes_the_other_and_reports_progress(tmp_path, capsys):
    torch.save(tiny_model().state_dict(), tmp_path / "backbone.pt")
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "text.onnx").write_bytes(b"stale graph of an earlier export")
    # its harma.json: files no harma_fast export lists are refused, never deleted (test_export.py)
    (out / "harma.json").write_text(json.dumps({"format": "harma_fast.onnx/1", "towers": {"text": "text.onnx"}}))
    args = ["export", "--model", "HarMA-Tiny", "--pretrained", str(tmp_path / "backbone.pt"), "--out", str(out),
            "--towers", "image"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "exporting the image tower" in err and "checking the fp32 graphs against PyTorch" in err
    assert not (out / "text.onnx").exists()
    assert list(json.loads((out / "harma.json").read_text())["towers"]) == ["image"]



def test_benchmark_report_compares_onnx_variants_with_torch_eager(tmp_path):
    from benchmarks.report import chart, markdown, speedups
    rows = [{"provider": p, "op": "onnx", "tower": "image", "batch": 16, "median_ms": ms, "q1_ms": ms, "q3_ms": ms,
             "images_per_s": 16e3 / ms, "max_abs": err, "min_cosine": cos, "device": "cpu"}
            for p, ms, err, cos in (("torch-cpu", 600.0, 0.0, 1.0), ("ort-fused", 500.0, 2e-7, 0.9999999),
                                    ("ort-int8", 150.0, 4e-2, 0.993))]
    ratios = {r["provider"]: (r["speedup"], r["baseline"]) for r in speedups(rows)}
    assert ratios["ort-int8"] == (4.0, "torch-cpu") and ratios["ort-fused"] == (1.2, "torch-cpu")
    assert "cos 0.99300" in markdown({}, rows)
    chart(rows, tmp_path / "chart.png")
    assert (tmp_path / "chart.png").stat().st_size > 0



def test_bench_onnx_script_prints_its_table_and_draws_the_chart(tmp_path, capsys):
    from benchmarks import bench_onnx
    png = tmp_path / "onnx.png"
    assert bench_onnx.main(["--graphs", str(tmp_path / "graphs"), "--rounds", "1", "--batches", "2",
                            "--providers", "torch-cpu", "ort-fused", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| ort-fused | image | 2 |" in out and "| ort-fused | text | 2 |" in out
    assert png.stat().st_size > 0 and f"chart: {png}" in out
    with pytest.raises(SystemExit) as exit_info:
        bench_onnx.main(["--png", str(tmp_path / "onnx.svg")])
    assert exit_info.value.code == 2 and "ending in .png" in capsys.readouterr().err

# -- fixed-batch graphs (CUDA graphs) ----------------------------------------------------------
def test_fixed_batch_graphs_pad_the_last_batch_and_leave_the_input_alone(tmp_path, capsys):
    model = patched_tiny()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--model", "HarMA-Tiny", "--out", str(tmp_path / "bad"), "--static-batch", "0"])
    assert exit_info.value.code == 2
    assert "--static-batch" in capsys.readouterr().err
    with pytest.raises(HarmaError, match="batch_size must be a positive integer"):
        export_onnx(model, tmp_path, batch_size=2.5)
    meta = export_onnx(model, tmp_path, batch_size=3, model_name="HarMA-Tiny")  # parity ran batches 1 and 7
    assert meta["batch_size"] == 3 and meta["dynamic_batch"] is False
    for tower in ("image", "text"):
        graph = onnx.load(str(tmp_path / f"{tower}.onnx")).graph
        assert graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    encoder = OrtEncoder(tmp_path, providers=["CPUExecutionProvider"])
    assert encoder.fixed_batch == 3
    pixels = np.random.default_rng(4).standard_normal((7, 3, 64, 64)).astype(np.float32)
    before = pixels.copy()
    with torch.no_grad():
        want = model.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
    for n in (7, 1, 3):  # two full batches and a padded one; one padded; exactly one
        assert_close(torch.from_numpy(encoder.encode_pixels(pixels[:n])), torch.from_numpy(want[:n]), atol=1e-5)
    assert np.array_equal(pixels, before), "the bound input buffer must not alias the caller's array"
    captions = ["a river next to a road", "many red roofs", "the airport", "a beach", "green field"]
    tokens = encoder.tokenizer(captions)
    with torch.no_grad():
        want = model.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
    assert_close(torch.from_numpy(encoder.encode_texts(captions)), torch.from_numpy(want), atol=1e-5)
    assert encoder.encode_pixels(pixels[:0]).shape == (0, meta["embed_dim"])


def test_cuda_graphs_only_for_fixed_batch_graphs_on_the_cuda_provider():
    from harma_fast.export.runtime import provider_list
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert provider_list(both, None) == both
    assert provider_list(both, 8) == [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    assert provider_list(["CPUExecutionProvider"], 8) == ["CPUExecutionProvider"]


def test_a_session_that_refuses_cuda_graphs_runs_without_them(tmp_path, monkeypatch):
    from harma_fast.export import runtime
    export_onnx(patched_tiny(), tmp_path, towers=("image",), batch_size=2, model_name="HarMA-Tiny", check=False)
    real_open = runtime.open_session
    monkeypatch.setattr(runtime, "provider_list", lambda providers, fixed: [(p, {"enable_cuda_graph": "1"})
                                                                          for p in providers])

    def open_session(path, options, providers):
        if any(isinstance(p, tuple) for p in providers):  # what ORT says when a node is not on the CUDA EP
            raise runtime.ExportFileError("This session cannot use the graph capture feature")
        return real_open(path, options, providers)
    monkeypatch.setattr(runtime, "open_session", open_session)
    encoder = OrtEncoder(tmp_path, providers=["CPUExecutionProvider"])
    with pytest.warns(UserWarning, match="CUDA graphs unavailable"):
        out = encoder.encode_pixels(np.zeros((3, 3, 64, 64), np.float32))
    assert out.shape == (3, encoder.embed_dim) and np.isfinite(out).all()
