"""Serving exported encoders with ONNX Runtime: no PyTorch, no Triton.

``OrtEncoder(dir)`` reads ``harma.json``, preprocesses images exactly as evaluation does
(RGB, bicubic resize to the model's square input, scale to [0, 1], normalise) and tokenizes
captions exactly as training does (cleaned as training cleans them, CLIP BPE), batches, and runs the graphs with
providers and session options chosen for their dtype (:func:`usable_providers`,
:func:`session_options`): fp32 and fp16 on
the CUDA execution provider when onnxruntime-gpu is installed, else the CPU provider; int8
(dynamic quantization, a CPU format) on the CPU provider. Every graph runs at ONNX Runtime's
full optimisation level.

Graphs exported with a fixed batch (``--static-batch N``) are run in batches of exactly N, the
last one padded (padding rows are dropped), through an I/O binding whose input and output
buffers are allocated once; on the CUDA provider that is what lets ONNX Runtime capture the
graph once and replay it (``enable_cuda_graph``), which removes per-node launch overhead. The
CUDA provider cannot be run on the machines this project is tested on: the binding path is
tested on the CPU provider, the CUDA options by inspection (README: Serving).
"""
from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

from ..errors import ConfigError, HarmaError, InputPathError, require_modules
from .families import load_tokenizer

FORMAT = "harma_fast.onnx/1"
GRAPH_DTYPE_KEY = "harma_fast.dtype"  # in each float graph's metadata_props (export_onnx writes it)
GRAPH_EXPORT_KEY = "harma_fast.export_id"  # in each graph's metadata_props: the export that wrote it
ImageLike = Union[str, Path, "PIL.Image.Image"]  # noqa: F821
# fp16 graphs crash ONNX Runtime's CPU provider at session creation in this layout pass (NCHWc
# blocking of the patch Conv); everything else of the full optimisation level is kept.
FP16_CPU_DISABLED_OPTIMIZERS = ("NchwcTransformer",)


class ExportDirError(HarmaError, FileNotFoundError):
    """An export directory, its harma.json, or a graph it lists is missing."""


class ExportFileError(HarmaError, ValueError):
    """harma.json or a graph of an export is unreadable, corrupt or of another format."""


def read_metadata(onnx_dir: Union[str, Path]) -> Dict:
    """``harma.json`` of an export directory, validated (clear errors when missing or foreign)."""
    directory = Path(onnx_dir)
    path = directory / "harma.json"
    if not directory.is_dir():
        state = "is a file, not a folder (give the export folder holding harma.json)" if directory.exists() \
            else "does not exist"
        raise ExportDirError(f"ONNX export directory {directory} {state}")
    if not path.is_file():
        raise ExportDirError(f"{directory} has no harma.json: not an export of harma_fast.export.export_onnx "
                                "(run `harma-fast export` to make one)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ExportFileError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportFileError(f"{path} has format {meta.get('format') if isinstance(meta, dict) else None!r}; this "
                         f"harma_fast reads {FORMAT!r} (re-export with this version)")
    missing = [k for k in ("export_id", "towers", "dtype", "embed_dim", "image", "text") if k not in meta]
    if missing:
        raise ExportFileError(f"{path} lacks {', '.join(missing)}; the export is incomplete (re-export it)")
    problem = _metadata_type_problem(meta)
    if problem:
        raise ExportFileError(f"{path}: {problem}; the file was edited or damaged (re-export the model)")
    for tower, name in meta["towers"].items():
        if not (directory / name).is_file():
            raise ExportDirError(f"{path} lists the {tower} tower as {name}, which is missing from {directory} "
                                 "(re-export with `harma-fast export`)")
    tokenizer = meta["text"].get("tokenizer") or {}
    name = tokenizer.get("file" if tokenizer.get("type") == "hf_tokenizers" else "vocab")
    if name and not (directory / name).is_file():
        raise ExportDirError(f"{path} lists the tokenizer file {name}, which is missing from {directory}: the export "
                             "is damaged (re-export with `harma-fast export`)")
    return meta


def _metadata_type_problem(meta: Dict) -> Optional[str]:
    """What is ill-typed in harma.json, or None: every later use trusts these fields."""
    def positive_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value > 0

    if not isinstance(meta["export_id"], str) or not meta["export_id"]:
        return f"'export_id' is {meta['export_id']!r}, not a string"
    if not isinstance(meta["towers"], dict) or not meta["towers"] or not set(meta["towers"]) <= {"image", "text"} \
            or not all(isinstance(v, str) for v in meta["towers"].values()):
        return "'towers' must map 'image' and/or 'text' to graph file names"
    if meta["dtype"] not in ("fp32", "fp16", "int8"):
        return f"'dtype' is {meta['dtype']!r}, not one of fp32, fp16, int8"
    if not positive_int(meta["embed_dim"]):
        return f"'embed_dim' is {meta['embed_dim']!r}, not a positive integer"
    image, text = meta["image"], meta["text"]
    if not isinstance(image, dict) or not isinstance(text, dict):
        return "'image' and 'text' must be objects"
    if "image" in meta["towers"]:
        if not positive_int(image.get("size")):
            return f"'image.size' is {image.get('size')!r}, not a positive integer"
        for key in ("mean", "std"):  # JSON reads NaN and Infinity too: every embedding would be NaN
            value = image.get(key)
            if not (isinstance(value, list) and len(value) == 3 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
                return f"'image.{key}' is {value!r}, not three finite numbers"
        if any(v <= 0 for v in image["std"]):
            return f"'image.std' holds a zero or a negative value ({image['std']!r})"
    if "text" in meta["towers"] and not positive_int(text.get("context_length")):
        return f"'text.context_length' is {text.get('context_length')!r}, not a positive integer"
    problem = _tokenizer_problem(text.get("tokenizer"), text.get("context_length"), positive_int)
    if problem:
        return problem
    if text.get("vocab_size") is not None and not positive_int(text["vocab_size"]):
        return f"'text.vocab_size' is {text['vocab_size']!r}, not a positive integer"
    if not meta.get("dynamic_batch", True) and meta.get("batch_size") is not None \
            and not positive_int(meta["batch_size"]):
        return f"'batch_size' is {meta['batch_size']!r}, not a positive integer"
    return None


def _tokenizer_problem(spec, context_length, positive_int) -> Optional[str]:
    """What is ill-typed in harma.json's ``text.tokenizer`` (None: the export has no tokenizer)."""
    if spec is None:
        return None
    if not isinstance(spec, dict):
        return f"'text.tokenizer' is {spec!r}, not an object"
    kind = spec.get("type", "clip_bpe")
    if kind not in ("clip_bpe", "hf_tokenizers"):
        return f"'text.tokenizer.type' is {kind!r}, not 'clip_bpe' or 'hf_tokenizers'"
    key = "file" if kind == "hf_tokenizers" else "vocab"
    if not isinstance(spec.get(key), str) or not spec[key]:
        return f"'text.tokenizer.{key}' is {spec.get(key)!r}, not a file name"
    if not positive_int(spec.get("context_length")):
        return f"'text.tokenizer.context_length' is {spec.get('context_length')!r}, not a positive integer"
    if kind == "hf_tokenizers" and (isinstance(spec.get("pad_id"), bool) or not isinstance(spec.get("pad_id"), int)):
        return f"'text.tokenizer.pad_id' is {spec.get('pad_id')!r}, not an integer"
    if context_length is not None and spec["context_length"] != context_length:
        return (f"the export is inconsistent: the tokenizer makes {spec['context_length']} tokens "
                f"('text.tokenizer.context_length'), the text graph reads {context_length} ('text.context_length')")
    return None


def default_providers(dtype: str = "fp32") -> List[str]:
    """CUDA first when onnxruntime-gpu has it (fp32, fp16); the CPU provider for int8."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = ("CPUExecutionProvider",) if dtype == "int8" else ("CUDAExecutionProvider", "CPUExecutionProvider")
    return [p for p in wanted if p in available]


def usable_providers(providers: Union[str, Sequence[str], None], dtype: str) -> List[str]:
    """``providers`` (one name or a list; default :func:`default_providers`) that this onnxruntime
    has, in order (an unavailable CUDA listed first made the fixed-batch buffers CUDA memory on a
    CPU-only onnxruntime; the buffers now follow the provider the session has). int8 graphs (dynamic quantization, a CPU format) run on the CPU provider."""
    import onnxruntime as ort

    if providers is None:
        return default_providers(dtype)
    wanted = [providers] if isinstance(providers, str) else list(providers)  # a string is one provider
    if not all(isinstance(p, str) for p in wanted):
        raise ConfigError(f"providers must be ONNX Runtime provider names, got {providers!r}")
    others = [p for p in wanted if p != "CPUExecutionProvider"]
    if dtype == "int8" and others:
        warnings.warn(f"int8 graphs run on the CPU provider only: {', '.join(others)} not used", stacklevel=3)
        wanted = ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    usable = [p for p in wanted if p in available]
    if not usable:
        raise ConfigError(f"none of the providers {wanted} is available in this onnxruntime "
                          f"{ort.__version__} (it has: {', '.join(available)})")
    return usable


def check_batch_size(batch_size) -> int:
    """A positive integer batch size (0 returned nothing, a negative one raised from range())."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def provider_list(providers: Sequence[str], fixed_batch: Optional[int]) -> List:
    """``providers`` with their options: CUDA graphs for fixed-batch graphs on the CUDA provider."""
    return [(p, {"enable_cuda_graph": "1"}) if p == "CUDAExecutionProvider" and fixed_batch else p
            for p in providers]


def session_options(dtype: str, threads: Optional[int] = None):
    """ONNX Runtime session options for a graph of ``dtype``, whatever provider runs it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    # for fp16 whatever the provider: the pass only touches nodes the CPU provider runs, and a
    # CUDA provider that fails at session creation falls back to the CPU, where the pass crashes
    if dtype == "fp16":
        options.add_session_config_entry("optimization.disable_specified_optimizers",
                                         ",".join(FP16_CPU_DISABLED_OPTIMIZERS))
    return options


class OrtEncoder:
    """Image and caption embeddings (L2-normalised float32) from an export directory."""

    def __init__(self, onnx_dir: Union[str, Path], providers: Union[str, Sequence[str], None] = None,
                 threads: Optional[int] = None):
        require_modules(("onnxruntime",), "OrtEncoder")
        # checked here: a string or float reached ONNX Runtime's SessionOptions only at the first encode,
        # as a TypeError listing pybind11 signatures
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise ConfigError(f"threads must be an integer >= 1 (0 or None: ONNX Runtime's default), got {threads!r}")
        self.dir = Path(onnx_dir)
        self.meta = read_metadata(self.dir)
        self.providers = usable_providers(providers, self.meta["dtype"])
        self.threads = threads
        self._sessions: Dict = {}
        self._bindings: Dict = {}
        # one lock per tower: a fixed-batch tower's bound buffers are shared by every call, and
        # sessions are created lazily; free-batch runs need no lock (InferenceSession.run is thread-safe)
        self._locks = {tower: threading.Lock() for tower in ("image", "text")}
        try:
            self.tokenizer = load_tokenizer(self.dir, self.meta["text"].get("tokenizer"))  # CLIP BPE, HF, or None
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001 - gzip, zlib, UTF-8 and tokenizers' own errors: a damaged file
            raise ExportFileError(f"the tokenizer file of the export in {self.dir} cannot be read ({type(err).__name__}: "
                                  f"{str(err)[:200]}): the export is damaged; re-export it with `harma-fast export`") from err

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size the graphs are fixed to, or None for a free batch axis."""
        if self.meta.get("dynamic_batch", True):
            return None
        return int(self.meta.get("batch_size") or 2)  # exports before batch_size was recorded fixed it at 2

    def _session(self, tower: str):
        if tower not in self.meta["towers"]:
            raise ValueError(f"the {tower} tower was not exported to {self.dir} (it holds: "
                             f"{', '.join(self.meta['towers'])}); re-export with towers including {tower!r}")
        if tower in self._sessions:
            return self._sessions[tower]
        with self._locks[tower]:
            if tower not in self._sessions:
                session = self._open(tower)
                check_graph(session, self.meta, tower, self.dir / self.meta["towers"][tower], self.fixed_batch)
                self._sessions[tower] = session
        return self._sessions[tower]

    def _open(self, tower: str):
        path = self.dir / self.meta["towers"][tower]
        options = session_options(self.meta["dtype"], self.threads)
        providers = provider_list(self.providers, self.fixed_batch)
        try:
            return open_session(path, options, providers)
        except ExportFileError as err:
            if providers == list(self.providers):
                raise
            # ONNX Runtime refuses CUDA graphs when a node falls back to the CPU: run without them
            import warnings

            warnings.warn(f"{path}: CUDA graphs unavailable ({err}); running without them", stacklevel=4)
            return open_session(path, options, self.providers)

    # -- images ------------------------------------------------------------------------------
    def preprocess(self, image: ImageLike) -> np.ndarray:
        """(3, S, S) float32, as ``harma_fast.data.transforms.eval_transform`` computes it."""
        from PIL import Image

        from ..io import open_rgb, to_rgb

        spec = self.meta["image"]
        if not isinstance(image, (Image.Image, str, os.PathLike)):
            raise ConfigError(f"an image must be a file path or a PIL image, got {type(image).__name__}; pass "
                              "arrays as PIL.Image.fromarray(array), or normalised pixels to encode_pixels")
        if not isinstance(image, Image.Image):
            path = Path(image)
            if path.is_dir():
                raise InputPathError(f"image {path} is a folder, not an image file")
            if not path.is_file():
                raise InputPathError(f"image {path} does not exist")
            # a ValueError (ImageReadError) for an undecodable, too large, 16-bit or float image
            image = open_rgb(path)
        else:
            try:  # PIL decodes lazily: an image whose file was closed first failed with a bare AssertionError
                image.load()
            except (AssertionError, OSError, ValueError) as err:
                why = str(err) or "its file was closed before it was read"
                raise ConfigError(f"the PIL image given cannot be decoded ({why}); pass its file path, or load it "
                                  "(image.load()) before closing the file") from err
            image = to_rgb(image)  # 16-bit / float pixels would be clipped by convert("RGB"): refused
        size = spec["size"]
        pixels = np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
        pixels = (pixels - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
        return pixels.transpose(2, 0, 1)

    def encode_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """Embeddings of preprocessed images ``(N, 3, S, S)`` (what :meth:`preprocess` makes)."""
        pixels = np.asarray(pixels)
        if not np.issubdtype(pixels.dtype, np.floating):  # raw 0..255 pixels would embed as garbage
            raise ValueError(f"pixels must be normalised floats (what OrtEncoder.preprocess makes), got {pixels.dtype}; "
                             "pass raw images to encode_images instead")
        pixels = np.ascontiguousarray(pixels, np.float32)
        size = self.meta["image"]["size"]
        if pixels.ndim != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (N, 3, {size}, {size}) for this export ({self.dir}), got "
                             f"{pixels.shape}; OrtEncoder.preprocess (or encode_images) makes them from images")
        bad = ~np.isfinite(pixels).all(axis=(1, 2, 3))
        if bad.any():  # a NaN pixel would silently give a NaN embedding
            raise ValueError(f"pixels of image(s) {np.flatnonzero(bad)[:10].tolist()} of the batch are NaN or "
                             "infinite; check the image decoding or normalisation that made them")
        return self._run("image", "pixels", pixels)

    def encode_images(self, images: Union[ImageLike, Iterable[ImageLike]], batch_size: int = 32) -> np.ndarray:
        """Embeddings of images (file paths or PIL images; one image or several)."""
        from PIL import Image

        check_batch_size(batch_size)
        # one path or image, as encode_texts takes one string (a path string was iterated by character)
        images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
        out = [self.encode_pixels(np.stack([self.preprocess(im) for im in images[i:i + batch_size]]))
               for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)

    # -- texts -------------------------------------------------------------------------------
    def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
        """Embeddings of token ids ``(N, context_length)`` (what :attr:`tokenizer` makes)."""
        tokens = np.asarray(tokens)
        length = self.meta["text"]["context_length"]
        if tokens.ndim != 2 or tokens.shape[1] != length or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integer ids of shape (N, {length}) for this export ({self.dir}), got "
                             f"{tokens.dtype} {tokens.shape}; encode_texts tokenizes captions for you")
        vocab = self.meta["text"].get("vocab_size") or np.iinfo(np.int64).max  # older exports lack it
        if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
            known = f"ids 0 to {vocab - 1}" if vocab < np.iinfo(np.int64).max else "ids from 0"
            raise ValueError(f"tokens hold ids from {tokens.min()} to {tokens.max()}; this export's vocabulary has "
                             f"{known} (encode_texts tokenizes captions for you)")
        return self._run("text", "tokens", np.ascontiguousarray(tokens, np.int64))

    # -- running -----------------------------------------------------------------------------
    def _run(self, tower: str, name: str, array: np.ndarray) -> np.ndarray:
        session = self._session(tower)
        if len(array) == 0:  # ONNX Runtime's int8 kernels divide by the row count (SIGFPE on 0 rows)
            return np.zeros((0, self.embed_dim), np.float32)
        fixed = self.fixed_batch
        if fixed is None:
            return session.run(None, {name: array})[0]
        out = []
        for start in range(0, len(array), fixed):
            chunk = array[start:start + fixed]
            n = len(chunk)
            if n < fixed:  # pad the last batch to the graph's; the padding rows' embeddings are dropped
                chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), chunk.dtype)])
            with self._locks[tower]:  # the bound buffers are shared: one batch at a time per tower
                out.append(self._run_bound(tower, name, chunk)[:n])
        return np.concatenate(out)

    def _run_bound(self, tower: str, name: str, chunk: np.ndarray) -> np.ndarray:
        """One fixed-shape batch through buffers bound once (the same addresses on every run, as
        CUDA graph replay requires). The caller holds the tower's lock."""
        import onnxruntime as ort

        if tower not in self._bindings:
            # the provider the session runs on (it may have fallen back from the first one listed)
            session_provider = self._sessions[tower].get_providers()[0]
            device = "cuda" if session_provider == "CUDAExecutionProvider" else "cpu"
            # buffers of ONNX Runtime's own: an OrtValue made from a numpy array would share the
            # caller's memory on the CPU, and the next batch's update would overwrite their input
            x = ort.OrtValue.ortvalue_from_shape_and_type(chunk.shape, chunk.dtype, device, 0)
            y = ort.OrtValue.ortvalue_from_shape_and_type((len(chunk), self.embed_dim), np.float32, device, 0)
            binding = self._sessions[tower].io_binding()
            binding.bind_ortvalue_input(name, x)
            binding.bind_ortvalue_output("embeddings", y)
            self._bindings[tower] = (binding, x)
        binding, x = self._bindings[tower]
        x.update_inplace(chunk)
        self._sessions[tower].run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def require_text(self) -> None:
        """Raise unless captions can be encoded: a text tower was exported, with its tokenizer."""
        self._session("text")  # says so first if the text tower was not exported
        if self.tokenizer is None:
            raise ValueError(f"the export in {self.dir} has no CLIP tokenizer (the model's tokenizer is not CLIP "
                             "BPE); tokenize yourself and call encode_tokens")

    def encode_texts(self, texts: Union[str, Sequence[str]], batch_size: int = 256, clean: bool = True) -> np.ndarray:
        """Embeddings of ``texts``, each cleaned first as training and evaluation clean captions
        (lower-case, punctuation removed: a comma or full stop is a token the adapters never saw;
        measured on the demo model, a query with both shared 5 of its top 10 hits with its cleaned
        form). ``clean=False`` tokenizes the texts as given."""
        self.require_text()
        check_batch_size(batch_size)
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ConfigError(f"texts[{i}] is {text!r}, not a string; encode_texts takes captions (strings)")
        if clean:
            texts = [clean_query(t) for t in texts]
        out = [self.encode_tokens(self.tokenizer(texts[i:i + batch_size])) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embed_dim), np.float32)


def clean_query(text: str) -> str:
    """A query as training saw its captions (``clean_caption``; not cut to a word count: the
    tokenizer's context is the limit, and ``search`` warns past it)."""
    from harma_fast.data.layouts import clean_caption

    return clean_caption(text, max_words=None)


_GRAPH_IO = {"image": ("pixels", "tensor(float)"), "text": ("tokens", "tensor(int64)")}


def check_graph(session, meta: Dict, tower: str, path: Path, fixed_batch: Optional[int]) -> None:
    """The graph's input and output agree with harma.json (an edited or mixed-up export would
    otherwise fail inside ONNX Runtime with a shape error, or give embeddings of the wrong size)."""
    name, dtype = _GRAPH_IO[tower]
    per_item = ([3, meta["image"]["size"], meta["image"]["size"]] if tower == "image"
                else [meta["text"]["context_length"]])
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expect = f"input {name!r} {dtype} of shape (batch, {', '.join(map(str, per_item))})"
    problems = []
    if len(inputs) != 1 or inputs[0].name != name or inputs[0].type != dtype:
        found = ", ".join(f"{i.name!r} {i.type}" for i in inputs)
        problems.append(f"its input is {found}, harma.json describes {expect}")
    elif list(inputs[0].shape[1:]) != per_item or inputs[0].shape[0] != (fixed_batch or inputs[0].shape[0]) \
            or (fixed_batch is None and isinstance(inputs[0].shape[0], int)):  # a fixed-batch graph in a free-batch export
        problems.append(f"its input has shape {tuple(inputs[0].shape)}, harma.json describes {expect}"
                        + (f" with batch {fixed_batch}" if fixed_batch is not None else " with a free batch axis"))
    width = outputs[0].shape[-1] if outputs and outputs[0].shape else None
    if not outputs or outputs[0].name != "embeddings" or (isinstance(width, int) and width != meta["embed_dim"]):
        found = ", ".join(f"{o.name!r} {tuple(o.shape)}" for o in outputs)
        problems.append(f"its output is {found}, harma.json says 'embeddings' of width {meta['embed_dim']}")
    graph_dtype = graph_dtype_of(session)
    if graph_dtype and graph_dtype != meta["dtype"]:
        problems.append(f"it is an {graph_dtype} graph, harma.json says dtype {meta['dtype']}")
    # a graph of the same shapes copied from an export of other weights ran unnoticed: its embeddings
    # were compared with the other tower's, and a search index made with the old graph was reused
    graph_export = session.get_modelmeta().custom_metadata_map.get(GRAPH_EXPORT_KEY)  # None: an older export
    if graph_export and graph_export != meta["export_id"]:
        problems.append(f"it was written by another export (export id {graph_export}, harma.json's is "
                        f"{meta['export_id']})")
    if problems:
        raise ExportFileError(f"{path} does not match {path.parent / 'harma.json'}: {'; '.join(problems)}. The "
                              "graph or harma.json was edited or comes from another export: re-export the model")


def graph_dtype_of(session) -> Optional[str]:
    """The dtype a graph was exported in, from its metadata (None for graphs of older exports):
    int8 graphs are ONNX Runtime quantizer's ("onnx.quantize"), float graphs record their dtype."""
    model = session.get_modelmeta()
    if model.producer_name == "onnx.quantize":
        return "int8"
    return model.custom_metadata_map.get(GRAPH_DTYPE_KEY)


def open_session(path: Path, options, providers: Sequence[str]):
    """An ``InferenceSession``; a truncated, corrupt or unloadable graph is a clear ExportFileError."""
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    try:
        return ort.InferenceSession(str(path), options, providers=list(providers))
    except (C.InvalidProtobuf, C.InvalidGraph, C.InvalidArgument, C.NoSuchFile, C.Fail, C.NotImplemented) as err:
        reason = ort_reason(err)
        weights = path.parent / f"{path.name}.data"  # where export_onnx keeps the weights of graphs past 2 GiB
        if "external" in reason.lower() and not weights.is_file():
            raise ExportDirError(f"{path} keeps its weights in {weights.name}, which is missing from {path.parent}: "
                                 "copy it there with the graph, or re-export with `harma-fast export`") from err
        # an empty or cut file: INVALID_ARGUMENT "No graph was found" (1.32), FAIL "does not have a graph" (1.30)
        if not isinstance(err, (C.Fail, C.NotImplemented)) or "does not have a graph" in reason:
            raise ExportFileError(f"{path} is not a loadable ONNX graph (truncated or corrupt?): re-export it with "
                                  f"`harma-fast export` ({type(err).__name__}: {reason[:200]})") from err
        raise ExportFileError(f"ONNX Runtime {ort.__version__} cannot load {path}: {reason[:300]}. "
                              "Re-export it with `harma-fast export` (add --plain-onnx for runtimes without "
                              "ONNX Runtime's contrib ops)") from err


# "failed:/onnxruntime_src/onnxruntime/core/graph/model.cc:187 onnxruntime::Model::Model(onnx::ModelProto&&, ...) "
_ORT_SOURCE = re.compile(r"failed:\s*\S+\.(?:cc|cpp|h):\d+ [^\s(]+\([^)]*\)\s*")


def ort_reason(err: BaseException) -> str:
    """ONNX Runtime's message, first line, without the C++ source location and signature some
    releases (1.30) put before the reason, which pushed the reason past any length we show."""
    lines = str(err).strip().splitlines()
    return _ORT_SOURCE.sub("failed: ", lines[0] if lines else "")
