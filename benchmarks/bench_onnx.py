"""Serving speed: PyTorch eager against every ONNX Runtime variant of the export, in one run.

Providers (all on the CPU; ONNX Runtime's CUDA provider needs onnxruntime-gpu and a GPU):

- ``torch-cpu``: the patched model in PyTorch eager (the reference path) — the baseline;
- ``ort-plain``: standard ONNX ops only (``--plain-onnx``);
- ``ort-fused``: every attention one ``com.microsoft.Attention`` (the default export);
- ``ort-int8``: the fused graphs with dynamic int8 weights (``--dtype int8``);
- ``ort-fp16``: fp16 graphs on the CPU provider (a CUDA format; shown because it must load);
- ``stock-ort-fused``: stock open_clip, no adapters, exported the same way (the adapters' cost).

Throughput at batch 1/16/64 and latency at batch 1, each provider's embeddings compared with
PyTorch's (max abs, min cosine). The machine may be shared, so every figure is the median of
rounds in which the providers run interleaved, and ratios are taken within one run.

Full size (``HARMA_BENCH_FULL=1`` or a GPU): ViT-B-32 with random non-zero adapters. CI size:
HarMA-Tiny, batches 1 and 4, one round. Also a script, printing a table (and, with ``--png``,
drawing the suite report's chart of the same rows: each provider's speed-up over torch eager):

    HARMA_BENCH_FULL=1 python -m benchmarks.bench_onnx [--graphs DIR] [--rounds 3] [--png onnx.png]
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

import harma_fast
from benchmarks._harness import FULL

MODEL = "ViT-B-32" if FULL else "HarMA-Tiny"
BATCHES = (1, 16, 64) if FULL else (1, 4)
ROUNDS = 3 if FULL else 1
SETTLE_S = 0.2 if FULL else 0.0
PROVIDERS = (("torch-cpu", "ort-plain", "ort-fused", "ort-int8", "ort-fp16", "stock-ort-fused") if FULL
             else ("torch-cpu", "ort-fused", "ort-int8", "stock-ort-fused"))


def build_models(name: str = MODEL, seed: int = 0):
    """(patched with random non-zero adapters, stock) — a trained model's cost, no weights needed."""
    torch.manual_seed(seed)
    stock = harma_fast.create_model(name).eval()
    patched = harma_fast.patch(copy.deepcopy(stock))
    with torch.no_grad():
        for pname, p in patched.named_parameters():
            if ".harma." in pname:
                p.normal_(0, p.shape[-1] ** -0.5 if p.ndim else 1.0)
    return harma_fast.set_backend(patched, "reference"), stock


def export_variants(patched, stock, root: Path, providers=PROVIDERS, name: str = MODEL) -> Dict[str, Path]:
    """Export directory per ONNX Runtime provider (reused when ``root`` already holds it)."""
    from harma_fast.export import export_onnx
    from harma_fast.export.quantize import quantize_tower

    plans = {"ort-plain": (patched, {"fused": False}), "ort-fused": (patched, {}),
             "ort-fp16": (patched, {"dtype": "fp16"}), "stock-ort-fused": (stock, {})}
    dirs = {}
    for provider in providers:
        out = root / provider
        dirs[provider] = out
        if provider in plans and not (out / "harma.json").is_file():
            model, kwargs = plans[provider]
            export_onnx(model, out, model_name=name, check=False, **kwargs)  # parity is measured below
    if "ort-int8" in providers and not (root / "ort-int8" / "harma.json").is_file():
        # the int8 graphs are the fused fp32 graphs, quantized (as export_onnx(dtype="int8") does)
        import json
        import shutil

        src, out = dirs["ort-fused"], root / "ort-int8"
        out.mkdir(parents=True, exist_ok=True)
        for tower in ("image", "text"):
            quantize_tower(src / f"{tower}.onnx", out / f"{tower}.onnx")
        for extra in src.glob("*.gz"):
            shutil.copy(extra, out / extra.name)
        meta = json.loads((src / "harma.json").read_text())
        (out / "harma.json").write_text(json.dumps(dict(meta, dtype="int8")))
    return {p: d for p, d in dirs.items() if p != "torch-cpu"}


def references(patched, stock, inputs: Dict) -> Dict:
    """PyTorch's embeddings per (model, tower, batch): what each provider's parity is measured against."""
    out = {}
    with torch.inference_mode():
        for label, model in (("patched", patched), ("stock", stock)):
            for (tower, batch), x in inputs.items():
                f = model.encode_image if tower == "image" else model.encode_text
                out[(label, tower, batch)] = f(torch.from_numpy(x), normalize=True).numpy()
    return out


def make_runners(patched, dirs: Dict[str, Path], inputs: Dict) -> Dict[str, Callable]:
    """{(provider, tower, batch): callable returning float32 embeddings}."""
    from harma_fast.export import OrtEncoder

    encoders = {p: OrtEncoder(d, providers=["CPUExecutionProvider"]) for p, d in dirs.items()}
    runners = {}
    for (tower, batch), x in inputs.items():
        tx = torch.from_numpy(x)

        @torch.inference_mode()
        def eager(tower=tower, tx=tx):
            f = patched.encode_image if tower == "image" else patched.encode_text
            return f(tx, normalize=True).numpy()
        runners[("torch-cpu", tower, batch)] = eager
        for provider, enc in encoders.items():
            run = enc.encode_pixels if tower == "image" else enc.encode_tokens
            runners[(provider, tower, batch)] = lambda run=run, x=x: run(x)
    return runners


def make_inputs(model, batches=BATCHES, seed: int = 0) -> Dict:
    rng = np.random.default_rng(seed)
    size = model.visual.image_size[0]
    ctx = model.context_length
    inputs = {}
    for b in batches:
        inputs[("image", b)] = rng.standard_normal((b, 3, size, size)).astype(np.float32)
        tokens = np.zeros((b, ctx), np.int64)
        for i in range(b):  # captions of varied length: start, words, end of text, padding
            n = int(rng.integers(5, ctx - 1))
            tokens[i, 0], tokens[i, 1:n], tokens[i, n] = 49406, rng.integers(1, 49000, n - 1), 49407
        inputs[("text", b)] = tokens
    return inputs


def parity(got: np.ndarray, want: np.ndarray) -> Dict[str, float]:
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    return {"max_abs": float(np.abs(got - want).max()), "min_cosine": float(cos.min())}


def interleaved(runners: Dict, want: Dict, rounds: int = ROUNDS, warmup: int = 1) -> List[Dict]:
    """Every runner timed once per round, the rounds interleaved; median and spread per runner."""
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in runners}
    for _ in range(rounds):
        for key, fn in runners.items():
            # the previous runner's idle threads (OpenMP, ONNX Runtime) spin a while before they sleep
            # and take cores from this one: measured +8% on a batch-1 ViT-B-32 right after torch eager
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            fn()
            times[key].append((time.perf_counter() - t0) * 1e3)
    rows = []
    for (provider, tower, batch), ms in times.items():
        ms = sorted(ms)
        rows.append({"provider": provider, "tower": tower, "batch": batch, "median_ms": statistics.median(ms),
                     "q1_ms": ms[len(ms) // 4], "q3_ms": ms[(3 * len(ms)) // 4],
                     f"{'images' if tower == 'image' else 'texts'}_per_s": batch / statistics.median(ms) * 1e3,
                     **parity(runners[(provider, tower, batch)](),
                              want[("stock" if provider.startswith("stock") else "patched", tower, batch)])})
    return rows


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    patched, stock = build_models()
    dirs = export_variants(patched, stock, tmp_path_factory.mktemp("onnx"))
    inputs = make_inputs(patched)
    rows = interleaved(make_runners(patched, dirs, inputs), references(patched, stock, inputs))
    return {(r["provider"], r["tower"], r["batch"]): r for r in rows}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("tower", ["image", "text"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_onnx_encode(benchmark, results, provider, tower, batch):
    row = results[(provider, tower, batch)]
    info = {k: v for k, v in row.items() if k not in ("tower", "batch")}
    benchmark.extra_info.update(info, op="onnx", model=MODEL, tower=tower, batch=batch, mode="forward",
                                device=f"cpu, {torch.get_num_threads()} threads (interleaved rounds: {ROUNDS})")
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # timed above, interleaved
    assert np.isfinite(row["min_cosine"])


def table(rows: List[Dict]) -> str:
    base = {(r["tower"], r["batch"]): r["median_ms"] for r in rows if r["provider"] == "torch-cpu"}
    stock = {(r["tower"], r["batch"]): r["median_ms"] for r in rows if r["provider"] == "stock-ort-fused"}
    lines = ["| provider | tower | batch | median ms (IQR) | items/s | vs torch eager | vs stock ORT | max abs | "
             "min cosine |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["tower"], r["batch"], PROVIDERS.index(r["provider"]))):
        key = (r["tower"], r["batch"])
        rate = r.get("images_per_s", r.get("texts_per_s"))
        vs_stock = f"{stock[key] / r['median_ms']:.2f}x" if key in stock else "–"
        lines.append(f"| {r['provider']} | {r['tower']} | {r['batch']} | {r['median_ms']:.1f} ({r['q1_ms']:.1f}–"
                     f"{r['q3_ms']:.1f}) | {rate:.1f} | {base[key] / r['median_ms']:.2f}x | {vs_stock} | "
                     f"{r['max_abs']:.1e} | {r['min_cosine']:.5f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graphs", type=Path, help="keep (and reuse) the exported graphs here")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--png", type=Path, help="also draw the speed-ups over torch eager here")
    args = parser.parse_args(argv)
    if args.png is not None and args.png.suffix.lower() != ".png":
        parser.error(f"--png {args.png}: give a file name ending in .png")
    patched, stock = build_models()
    root = args.graphs or Path(tempfile.mkdtemp(prefix="bench_onnx-"))
    t0 = time.perf_counter()
    dirs = export_variants(patched, stock, root, args.providers)
    print(f"graphs in {root} ({time.perf_counter() - t0:.0f} s)", flush=True)
    dirs = {p: d for p, d in dirs.items() if p in args.providers}
    inputs = make_inputs(patched, args.batches)
    rows = interleaved(make_runners(patched, dirs, inputs), references(patched, stock, inputs), args.rounds)
    import onnxruntime

    from benchmarks._harness import cpu_description

    print(f"{MODEL}, {cpu_description()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"onnxruntime {onnxruntime.__version__}, median of {args.rounds} "
          f"interleaved rounds, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(table(rows))
    if args.png is not None:
        from benchmarks.report import chart

        device = f"ONNX serving, {MODEL}: {cpu_description()}"
        chart([dict(r, op="onnx", device=device) for r in rows], args.png)
        print(f"chart: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
