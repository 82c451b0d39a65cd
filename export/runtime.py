"""Serving exported encoders with ONNX Runtime: no PyTorch, no Triton.

``OrtEncoder(dir)`` reads ``harma.json``, preprocesses images exactly as evaluation does
(RGB, bicubic resize to the model's square input, scale to [0, 1], normalise) and tokenizes
captions exactly as training does (CLIP BPE, lower-cased), batches, and runs the graphs on
the CUDA execution provider when onnxruntime-gpu is installed, the CPU provider otherwise.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from .families import load_tokenizer

FORMAT = "harma_fast.onnx/1"
ImageLike = Union[str, Path, "PIL.Image.Image"]  # noqa: F821


def read_metadata(onnx_dir: Union[str, Path]) -> Dict:
    """``harma.json`` of an export directory, validated (clear errors when missing or foreign)."""
    directory = Path(onnx_dir)
    path = directory / "harma.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"ONNX export directory {directory} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no harma.json: not an export of harma_fast.export.export_onnx "
                                "(run `harma-fast export` to make one)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} has format {meta.get('format') if isinstance(meta, dict) else None!r}; this "
                         f"harma_fast reads {FORMAT!r} (re-export with this version)")
    missing = [k for k in ("towers", "dtype", "embed_dim", "image", "text") if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}; the export is incomplete (re-export it)")
    for tower, name in meta["towers"].items():
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{path} lists the {tower} tower as {name}, which is missing from {directory}")
    return meta


def default_providers() -> List[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtEncoder:
    """Image and caption embeddings (L2-normalised float32) from an export directory."""

    def __init__(self, onnx_dir: Union[str, Path], providers: Optional[Sequence[str]] = None,
                 threads: Optional[int] = None):
        self.dir = Path(onnx_dir)
        self.meta = read_metadata(self.dir)
        self.providers = list(providers or default_providers())
        self.threads = threads
        self._sessions: Dict = {}
        spec = self.meta["text"].get("tokenizer")
        self.tokenizer = load_tokenizer(self.dir, spec)  # CLIP BPE, a HF tokenizer.json, or None

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def _session(self, tower: str):
        if tower not in self.meta["towers"]:
            raise ValueError(f"the {tower} tower was not exported to {self.dir} (it holds: "
                             f"{', '.join(self.meta['towers'])}); re-export with towers including {tower!r}")
        if tower not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            if self.threads:
                options.intra_op_num_threads = self.threads
            if self.meta["dtype"] == "fp16" and self.providers[0] == "CPUExecutionProvider":
                # onnxruntime's layout optimisations crash on fp16 graphs on the CPU provider
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            self._sessions[tower] = ort.InferenceSession(str(self.dir / self.meta["towers"][tower]), options,
                                                         providers=self.providers)
        return self._sessions[tower]

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, image: ImageLike) -> np.ndarray:
        """(3, S, S) float32, as ``harma_fast.data.transforms.eval_transform`` computes it."""
        from PIL import Image, UnidentifiedImageError

        spec = self.meta["image"]
        if not isinstance(image, Image.Image):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"image {path} does not exist")
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")
            except (UnidentifiedImageError, OSError, ValueError) as err:
                raise ValueError(f"image {path} cannot be read: {err}") from err
        else:
            image = image.convert("RGB")
        size = spec["size"]
        pixels = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
        return pixels.transpose(2, 0, 1)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        return self._session("image").run(None, {"pixels": np.ascontiguousarray(pixels, np.float32)})[0]

    def encode_images(self, images: Iterable[ImageLike], batch_size: int = 32) -> np.ndarray:
        images = list(images)
        out = [self.encode_pixels(np.stack([self.preprocess(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # -- texts -------------------------------------------------------------------------------
    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        return self._session("text").run(None, {"tokens": np.ascontiguousarray(tokens, np.int64)})[0]

    def encode_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 256) -> np.ndarray:
        self._session("text")  # says so first if the text tower was not exported
        if self.tokenizer is None:
            raise ValueError(f"the export in {self.dir} has no CLIP tokenizer (the model's tokenizer is not CLIP "
                             "BPE); tokenize yourself and call encode_tokens")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = [self.encode_tokens(self.tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)
