"""int8 graphs for the CPU: dynamic QInt8 weights, per output channel; and how they are judged.

Every MatMul weight is quantized to int8 per output channel and every fused ``Attention``
weight per tensor (``onnxruntime.quantization.quantize_dynamic``); activations are quantized
on the fly, per tensor, at run time. The patch-embedding Conv stays fp32: it reads raw pixels
and is ~3% of a ViT-B-32's multiply-adds.

Weights use 7 of the 8 bits (``reduce_range``). On a CPU without VNNI, ONNX Runtime's u8×s8
kernels add pairs of products in 16-bit registers, which saturate for full-range weights: the
ViT-B-32 image tower (random non-zero adapters, 16 random images) measured cosine to fp32 0.9944
with 8-bit weights and 0.9997 with 7-bit ones, at the same speed; the text tower 0.9982 and
0.9980 (2-core AMD EPYC, AVX2 without VNNI, onnxruntime 1.32, 2026-11-24). A graph is exported on
one machine and served on others, so it is built to be exact where it saturates; on a VNNI CPU the
seventh bit costs what the text tower shows (~2e-4 cosine).

Why dynamic and not static (calibrated) int8. Static int8 removes dynamic quantization's batch
dependence (activation scales are per batch, so an embedding moves slightly with its
batch-mates) but is slower here: a prototype (``quantize_static``, QDQ, MatMuls per channel,
calibrated on 32 images) of ViT-B-32's image tower ran batch 16 at 1.25x the fp32 graph's
speed against dynamic's 1.71x (batch 1: 1.31x against 1.45x; 2-core AMD EPYC with AVX2, no VNNI,
onnxruntime 1.32, one interleaved run, 2026-11-23), because the CPU provider has no QDQ form of
the fused ``Attention``: its in-projection, a third of the block's weights, stays fp32. Its
cosine to fp32 was 0.9960 against dynamic's 0.9947 and it needs a representative calibration
set at export; batch dependence measured 0.9984 cosine (batch 16 against batch 1) for dynamic.

int8 cannot match PyTorch to 1e-4, so it is judged by what users care about:

- every embedding's cosine to PyTorch's is at least :data:`MIN_COSINE`;
- given an evaluation file, retrieval through the int8 graphs matches the fp32 graphs': their
  mean (mR) within :data:`MEAN_RECALL_TOLERANCE` point either way, and no R@1/5/10 (either
  direction) more than :data:`RECALL_TOLERANCE` points (or one query, on sets so small that
  one query weighs more) below fp32's. A single recall is judged one-sided because on a
  100-image set it moves by several queries either way from rounding alone (measured on the
  demo's model: image->text R@5 22 with int8 against 17 with fp32, mR within 1.0); an int8
  graph that scores higher is not a regression, one that scores lower is refused.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict

# catches a broken graph (a lost mask, misread scales), not an accuracy promise: a random HarMA-Tiny
# (width 64) measures 0.976 at worst; retrieval on an evaluation file is the accuracy judge
MIN_COSINE = 0.95
RECALL_TOLERANCE = 2.0
MEAN_RECALL_TOLERANCE = 1.0
OP_TYPES = ("MatMul", "Attention")


def quantize_tower(src: Path, dst: Path) -> None:
    """``src`` (fp32 graph) -> ``dst`` with dynamic QInt8 weights (atomic).

    Two passes: ONNX Runtime's ``QAttention`` kernel reads one weight scale (per-channel scales
    give it errors of ~10% of the output, measured), so fused attentions are quantized per
    tensor; then every MatMul per output channel.
    """
    import logging
    import tempfile

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ..io import atomic_path

    quiet = logging.getLogger().level
    logging.getLogger().setLevel(max(quiet, logging.ERROR))  # it logs one line per skipped node
    # a graph past protobuf's 2 GiB (its weights in <name>.data beside it) is quantized the same way:
    # the intermediate graph, three quarters fp32, would not fit in one file either
    large = (src.parent / f"{src.name}.data").is_file()
    try:
        with tempfile.TemporaryDirectory(dir=dst.parent, prefix=".quantize-") as scratch:
            step, final = Path(scratch) / "attention.onnx", Path(scratch) / dst.name
            quantize_dynamic(str(src), str(step), weight_type=QuantType.QInt8, per_channel=False,
                             op_types_to_quantize=["Attention"], reduce_range=True, use_external_data_format=large)
            quantize_dynamic(str(step), str(final), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], reduce_range=True, use_external_data_format=large,
                             extra_options={"MatMulConstBOnly": True})
            # the graph and its weights file under their final names (the graph refers to the latter by name)
            if large:
                os.replace(Path(scratch) / f"{dst.name}.data", dst.parent / f"{dst.name}.data")
            with atomic_path(dst) as tmp:
                os.replace(final, tmp)
    finally:
        logging.getLogger().setLevel(quiet)


def retrieval_check(reference_dir: Path, int8_dir: Path, check_file, image_root,
                    progress=None, records=None) -> Dict:
    """R@1/5/10 both ways and mR of the fp32 graphs and of the int8 graphs on one evaluation file
    (``records``: the file already read, as ``load_eval_records`` returns it).

    Returns ``{"fp32": metrics, "int8": metrics, "ok": bool, "failures": [...]}``.
    """
    import torch

    from ..data.annotations import load_eval_records
    from ..metrics import retrieval_metrics
    from .runtime import OrtEncoder

    records = records if records is not None else load_eval_records(check_file, image_root)
    out: Dict = {"check_file": str(check_file), "images": len(records.images), "captions": len(records.captions)}
    for label, directory in (("fp32", reference_dir), ("int8", int8_dir)):
        if progress:
            progress(f"retrieval check: encoding {len(records.images)} images and {len(records.captions)} "
                     f"captions with the {label} graphs")
        encoder = OrtEncoder(directory, providers=["CPUExecutionProvider"])
        images = torch.from_numpy(encoder.encode_images(records.images))
        texts = torch.from_numpy(encoder.encode_texts(records.captions))
        out[label] = retrieval_metrics(images, texts, torch.tensor(records.text_to_image), backend="reference")
    out["failures"] = recall_failures(out["fp32"], out["int8"], len(records.images), len(records.captions))
    out["ok"] = not out["failures"]
    return out


def recall_failures(fp32: Dict[str, float], int8: Dict[str, float], images: int, captions: int) -> list:
    """What int8 loses beyond its tolerance (``txt_r*`` rank captions for each of ``images``
    queries, ``img_r*`` images for each of ``captions``); mR is judged both ways."""
    failures = []
    for key, want in fp32.items():
        one_query = 100.0 / (images if key.startswith("txt") else captions)
        limit = MEAN_RECALL_TOLERANCE if key == "r_mean" else max(RECALL_TOLERANCE, one_query)
        if key == "r_mean" and abs(int8[key] - want) > limit:
            failures.append(f"{key} {int8[key]:.2f} vs fp32 {want:.2f} (allowed ±{limit})")
        elif key != "r_mean" and want - int8[key] > limit:
            failures.append(f"{key} {int8[key]:.2f} vs fp32 {want:.2f} (allowed -{limit})")
    return failures


