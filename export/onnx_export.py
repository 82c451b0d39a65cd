"""Export the (adapted) encoders to ONNX, and check every export against PyTorch.

    from harma_fast.export import export_onnx, OrtEncoder
    export_onnx(model, "onnx/")            # image.onnx, text.onnx, harma.json (+ the tokenizer's merges)
    enc = OrtEncoder("onnx/")              # ONNX Runtime only: no PyTorch needed to serve

Export traces the reference path (plain ONNX ops, never a Triton kernel), with the
``nn.MultiheadAttention`` fast path switched off (it has no ONNX mapping) and the tokens cast
to int32 before the end-of-text ArgMax (ONNX Runtime has no int64 ArgMax). After writing, the
graphs are run with ONNX Runtime on fresh random inputs at several batch sizes and caption
lengths and compared with PyTorch; an export that does not match is removed and refused.
"""
from __future__ import annotations

import copy
import json
import uuid
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.transforms import model_image_spec
from ..io import PathLike, atomic_path

FORMAT = "harma_fast.onnx/1"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOLERANCE = {"fp32": {"max_abs": 1e-4, "min_cosine": 0.99999}, "fp16": {"max_abs": 2e-2, "min_cosine": 0.999}}
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportParityError(RuntimeError):
    """The ONNX graphs did not reproduce PyTorch; the files were removed."""


class ImageTower(nn.Module):
    """float32 pixels (B, 3, S, S) -> L2-normalised float32 embeddings (B, D)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, pixels):
        return self.model.encode_image(pixels.to(self.dtype), normalize=True).float()


class TextTower(nn.Module):
    """int64 tokens (B, context) -> L2-normalised float32 embeddings (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        # int32 ids: the end-of-text pooling is an ArgMax, which ONNX Runtime lacks for int64
        return self.model.encode_text(tokens.to(torch.int32), normalize=True).float()


def _vocab_path() -> Optional[Path]:
    import open_clip

    path = Path(open_clip.__file__).parent / VOCAB_FILE
    return path if path.is_file() else None


def _tokenizer_spec(model: nn.Module, name: Optional[str]) -> Optional[Dict]:
    """CLIP BPE tokenizers are served by harma_fast.export.tokenizer; others are not supported."""
    import open_clip

    from ..models import register_model_configs
    from .families import hf_tokenizer_spec, vocab_size

    spec = hf_tokenizer_spec(model, name)  # a local Hugging Face folder's own tokenizer
    if spec:
        return spec
    register_model_configs()
    tokenizer = open_clip.get_tokenizer(name) if name else None
    clip_bpe = tokenizer is None or (type(tokenizer).__name__ == "SimpleTokenizer"
                                     and getattr(tokenizer, "reduction_fn", None) is None)
    if not clip_bpe or vocab_size(model) != 49408 or _vocab_path() is None:
        return None
    return {"type": "clip_bpe", "vocab": VOCAB_FILE, "context_length": int(model.context_length)}


def _export_tower(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: Optional[int],
                  dynamic_batch: bool) -> None:
    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if dynamic_batch else None
    with atomic_path(path) as tmp:
        program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=["embeddings"],
                                    dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False)
        program.save(str(tmp))


def export_onnx(model: nn.Module, out_dir: PathLike, towers: Sequence[str] = ("image", "text"), dtype: str = "fp32",
                opset: Optional[int] = None, dynamic_batch: bool = True, model_name: Optional[str] = None,
                check: bool = True) -> Dict:
    """Write ``image.onnx``/``text.onnx`` and ``harma.json`` to ``out_dir``; returns the metadata.

    Args:
        model: an open_clip CLIP, patched with HarMA or not (it is not modified).
        towers: which encoders to export.
        dtype: ``"fp32"`` or ``"fp16"`` weights and arithmetic (inputs and outputs stay float32).
        opset: ONNX opset (the exporter's default when None).
        dynamic_batch: a free batch axis (else the graphs are fixed to the example batch of 2).
        model_name: open_clip architecture name, for the tokenizer (defaults to the name
            ``harma_fast.create_model`` recorded on the model).
        check: run :func:`check_parity` and refuse (remove the files) when it fails.
    """
    import open_clip

    from .. import __version__
    from ..patching import is_patched, set_backend

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
    towers = tuple(towers)
    if not towers or any(t not in ("image", "text") for t in towers):
        raise ValueError(f"towers must be a non-empty subset of ('image', 'text'), got {towers!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_name = model_name or getattr(model, "harma_model_name", None)

    # a private CPU copy in the export dtype, on the reference path: the user's model is untouched
    work = copy.deepcopy(model).to("cpu", _DTYPES[dtype]).eval()
    if is_patched(work):
        set_backend(work, "reference")
    size, mean, std = model_image_spec(work)
    tokenizer = _tokenizer_spec(work, model_name) if "text" in towers else None
    written = []
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # the MHA fast path has no ONNX mapping
    try:
        with torch.no_grad():
            if "image" in towers:
                _export_tower(ImageTower(work, _DTYPES[dtype]).eval(), torch.randn(2, 3, size, size), out / "image.onnx",
                              "pixels", opset, dynamic_batch)
                written.append(out / "image.onnx")
            if "text" in towers:
                example = torch.randint(1, 49406, (2, int(work.context_length)))
                _export_tower(TextTower(work).eval(), example, out / "text.onnx", "tokens", opset, dynamic_batch)
                written.append(out / "text.onnx")
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)
    if tokenizer:
        from .families import write_tokenizer_files

        write_tokenizer_files(tokenizer, out, _vocab_path())
    with torch.no_grad():
        embed_dim = int(work.encode_image(torch.zeros(1, 3, size, size, dtype=_DTYPES[dtype])).shape[-1])
    import onnx
    import onnxruntime

    meta = {
        "format": FORMAT, "export_id": uuid.uuid4().hex, "model": model_name, "embed_dim": embed_dim,
        "towers": {t: f"{t}.onnx" for t in towers}, "dtype": dtype, "dynamic_batch": dynamic_batch,
        "image": {"size": size, "mean": list(mean), "std": list(std), "interpolation": "bicubic", "mode": "RGB"},
        "text": {"context_length": int(work.context_length), "tokenizer": tokenizer},
        "outputs_normalized": True,
        "harma_config": json.loads(work.harma_config.to_json()) if is_patched(work) else None,
        "versions": {"harma_fast": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                     "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
    }
    _write_meta(out, meta)
    if check:
        report = check_parity(model, out)
        meta["parity"] = report
        _write_meta(out, meta)
        failures = [f"{t} tower at batch {r['batch']}: max abs {r['max_abs']:.2e}, cosine {r['min_cosine']:.6f}"
                    for t, rows in report.items() for r in rows if not r["ok"]]
        if failures:
            for path in written + [out / "harma.json"]:
                path.unlink(missing_ok=True)
            raise ExportParityError(f"ONNX export to {out} does not match PyTorch ({dtype} tolerance "
                                    f"{TOLERANCE[dtype]}): {'; '.join(failures)}. The files were removed.")
    return meta


def _write_meta(out: Path, meta: Dict) -> None:
    with atomic_path(out / "harma.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2))


def _random_captions(n: int, rng: np.random.Generator, words: int) -> list:
    vocab = ("river", "lake", "road", "roofs", "red", "green", "field", "forest", "bridge", "many", "a", "the",
             "of", "next", "to", "large", "small", "parking", "lot", "airport", "runway", "beach", "sea", "port")
    return [" ".join(rng.choice(vocab, size=max(1, words + int(rng.integers(-1, 2))))) for _ in range(n)]


def check_parity(model: nn.Module, out_dir: PathLike, batch_sizes: Sequence[int] = (1, 7), seed: int = 0) -> Dict:
    """ONNX Runtime against PyTorch (float32, reference path) on fresh random inputs.

    Returns ``{tower: [{"batch", "max_abs", "min_cosine", "ok", ...}, ...]}``; text rows cover
    short and long (truncated) captions.
    """
    from ..patching import is_patched, set_backend
    from .runtime import OrtEncoder

    encoder = OrtEncoder(out_dir, providers=["CPUExecutionProvider"])
    meta = encoder.meta
    ref = copy.deepcopy(model).to("cpu", torch.float32).eval()
    if is_patched(ref):
        set_backend(ref, "reference")
    tol = TOLERANCE[meta["dtype"]]
    rng = np.random.default_rng(seed)
    size = meta["image"]["size"]
    report: Dict = {}

    def compare(got: np.ndarray, want: np.ndarray, **info) -> Dict:
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        row = {"max_abs": float(np.abs(got - want).max()), "min_cosine": float(cos.min()), **info}
        row["ok"] = bool(np.isfinite(got).all() and row["max_abs"] <= tol["max_abs"]
                         and row["min_cosine"] >= tol["min_cosine"])
        return row
    with torch.no_grad():
        if "image" in meta["towers"]:
            rows = []
            for b in batch_sizes:
                pixels = rng.standard_normal((b, 3, size, size)).astype(np.float32)
                want = ref.encode_image(torch.from_numpy(pixels), normalize=True).numpy()
                rows.append(compare(encoder.encode_pixels(pixels), want, batch=b))
            report["image"] = rows
        if "text" in meta["towers"]:
            rows = []
            ctx = meta["text"]["context_length"]
            for b in batch_sizes:
                for words, label in ((3, "short"), (ctx + 10, "long")):
                    if meta["text"]["tokenizer"]:
                        tokens = encoder.tokenizer(_random_captions(b, rng, words))
                    else:
                        from .families import random_tokens

                        tokens = random_tokens(ref, rng, b, ctx, words + 2)  # inside the model's vocabulary
                    want = ref.encode_text(torch.from_numpy(tokens), normalize=True).numpy()
                    rows.append(compare(encoder.encode_tokens(tokens), want, batch=b, captions=label))
            report["text"] = rows
    return report
