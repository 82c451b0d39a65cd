"""Export the (adapted) encoders to ONNX, and check every export against PyTorch.

    from harma_fast.export import export_onnx, OrtEncoder
    export_onnx(model, "onnx/")            # image.onnx, text.onnx, harma.json (+ the tokenizer's merges)
    enc = OrtEncoder("onnx/")              # ONNX Runtime only: no PyTorch needed to serve

Export traces the reference path (never a Triton kernel), with the ``nn.MultiheadAttention``
fast path switched off (it has no ONNX mapping) and the tokens cast to int32 before the
end-of-text ArgMax (ONNX Runtime has no int64 ArgMax). By default every attention becomes one
fused ``com.microsoft.Attention`` node (``harma_fast.export.fuse``); ``fused=False`` keeps
standard ONNX ops only, for runtimes without ONNX Runtime's contrib ops (e.g. TensorRT, which
fuses attention itself). Either way weights are stored pre-transposed. ``dtype="int8"``
quantizes the fused fp32 graphs (``harma_fast.export.quantize``).

The graphs are written to a scratch folder inside the output folder, run with ONNX Runtime on
fresh random inputs at several batch sizes and caption lengths and compared with PyTorch, and
moved into place only if they match; a refused export writes nothing (an earlier one is kept).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import model_image_spec
from ..errors import ConfigError, HarmaError, OutputPathError
from ..io import PathLike, atomic_path
from . import quantize
from .runtime import GRAPH_DTYPE_KEY, GRAPH_EXPORT_KEY

FORMAT = "harma_fast.onnx/1"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
TOLERANCE = {"fp32": {"max_abs": 1e-4, "min_cosine": 0.99999}, "fp16": {"max_abs": 2e-2, "min_cosine": 0.999},
             "int8": {"max_abs": None, "min_cosine": quantize.MIN_COSINE}}
LARGE_GRAPH_BYTES = 2 ** 31 - 2 ** 26  # protobuf's 2 GiB limit, less a margin: larger graphs keep weights apart
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.float32}  # int8: quantized after export
TOWER_FILES = {"image": "image.onnx", "text": "text.onnx"}


class ExportParityError(HarmaError, RuntimeError):
    """The ONNX graphs did not reproduce PyTorch (or int8 changed retrieval); nothing was written."""


class ImageTower(nn.Module):
    """float32 pixels (B, 3, S, S) -> L2-normalised float32 embeddings (B, D)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, pixels):
        # normalised in float32: an fp16 graph normalised in fp16, its embeddings' norms off by up to 5e-4
        return F.normalize(self.model.encode_image(pixels.to(self.dtype)).float(), dim=-1)


class TextTower(nn.Module):
    """int64 tokens (B, context) -> L2-normalised float32 embeddings (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        # int32 ids: the end-of-text pooling is an ArgMax, which ONNX Runtime lacks for int64
        return F.normalize(self.model.encode_text(tokens.to(torch.int32)).float(), dim=-1)  # as ImageTower


def _vocab_path() -> Optional[Path]:
    import open_clip

    path = Path(open_clip.__file__).parent / VOCAB_FILE
    return path if path.is_file() else None


def _uses_clip_bpe(name: Optional[str]) -> bool:
    """Whether open_clip tokenizes ``name``'s captions with plain CLIP BPE, read from its config:
    building the tokenizer (``open_clip.get_tokenizer``) would download SigLIP's and other
    Hugging Face tokenizers from the hub."""
    import open_clip

    if not name:
        return True  # a model built without a name: open_clip's default tokenizer is CLIP BPE
    if open_clip.factory.parse_model_name(name)[0] is not None:
        return False  # hf-hub:/local-dir: names: their tokenizer is decided by files we do not read here
    config = open_clip.get_model_config(name)
    text_cfg = (config or {}).get("text_cfg", {})
    kwargs = text_cfg.get("tokenizer_kwargs", {})
    # open_clip's own rules (factory.get_tokenizer): an hf_tokenizer_name or a SigLIP name means
    # another tokenizer; cleaning other than lower-casing or a reduction mask changes the ids
    return ("hf_tokenizer_name" not in text_cfg and "siglip" not in name.lower()
            and not kwargs.get("reduction_mask") and kwargs.get("clean", "lower") == "lower")


def _tokenizer_spec(model: nn.Module, name: Optional[str]) -> Optional[Dict]:
    """CLIP BPE tokenizers are served by harma_fast.export.tokenizer; others are not supported."""
    from ..models import register_model_configs
    from .families import hf_tokenizer_spec, vocab_size

    spec = hf_tokenizer_spec(model, name)  # a local Hugging Face folder's own tokenizer
    if spec:
        return spec
    register_model_configs()
    if not _uses_clip_bpe(name) or vocab_size(model) != 49408 or _vocab_path() is None:
        return None
    return {"type": "clip_bpe", "vocab": VOCAB_FILE, "context_length": int(model.context_length)}


def _check_finite(model: nn.Module) -> None:
    """Refuse NaN or infinite weights before exporting: the export ran for minutes, then parity
    blamed ONNX ("does not match PyTorch, max abs nan")."""
    from ..checkpoints import non_finite

    bad = non_finite(model.state_dict())
    if bad:
        raise ConfigError(f"the model's {bad[0]} holds NaN or infinite values (adapters of a diverged training run?); "
                          "export weights that are finite")


def _export_tower(module: nn.Module, example: torch.Tensor, path: Path, input_name: str, opset: Optional[int],
                  batch_size: Optional[int], fused: bool, dtype: str, export_id: str) -> None:
    import onnx

    from .fuse import fold_initializer_transposes, translation_table

    dynamic = ({0: torch.export.Dim("batch", min=1, max=65536)},) if batch_size is None else None
    program = torch.onnx.export(module, (example,), input_names=[input_name], output_names=["embeddings"],
                                dynamo=True, dynamic_shapes=dynamic, opset_version=opset, verbose=False,
                                custom_translation_table=translation_table() if fused else None)
    graph = program.model_proto
    fold_initializer_transposes(graph)
    # what the runtime checks against harma.json (an fp16 graph swapped into an fp32 export looks alike
    # from outside: float32 in, float32 out); int8 graphs say so themselves (producer onnx.quantize)
    graph.metadata_props.add(key=GRAPH_DTYPE_KEY, value=dtype)
    graph.metadata_props.add(key=GRAPH_EXPORT_KEY, value=export_id)  # and which export: harma.json's export_id
    with atomic_path(path) as tmp:
        # graphs past protobuf's 2 GiB limit (ViT-bigG) keep their weights in a file beside them
        large = graph.ByteSize() > LARGE_GRAPH_BYTES
        onnx.save_model(graph, str(tmp), save_as_external_data=large, location=f"{path.name}.data")


def check_out_dir(out: PathLike, towers: Sequence[str], what: str = "out_dir") -> None:
    """Refuse, before any work, an output folder holding files that publishing would delete or
    replace and that no earlier harma_fast export there lists (a user's own text.onnx or
    harma.json was deleted by an image-only export)."""
    from .families import HF_TOKENIZER_FILE

    out = Path(out)
    if not out.is_dir():
        return
    replaced = ["harma.json", *TOWER_FILES.values(), *(f"{n}.data" for n in TOWER_FILES.values())]
    if "text" in towers:
        replaced += [VOCAB_FILE, HF_TOKENIZER_FILE]
    ours = _earlier_export_files(out)
    foreign = [name for name in replaced if (out / name).exists() and name not in ours]
    if foreign:
        raise OutputPathError(f"{what} {out} holds {', '.join(foreign)}, not from a harma_fast export (an export there "
                              "would replace or delete them); export to another folder, or move them away")


def _earlier_export_files(out: Path) -> set:
    """The files the harma.json of an earlier harma_fast export in ``out`` lists (none if it has none)."""
    try:
        meta = json.loads((out / "harma.json").read_text())
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        return set()
    towers = meta.get("towers") if isinstance(meta.get("towers"), dict) else {}
    text = meta.get("text") if isinstance(meta.get("text"), dict) else {}
    tokenizer = text.get("tokenizer") if isinstance(text.get("tokenizer"), dict) else {}
    graphs = [name for name in towers.values() if isinstance(name, str)]
    return {"harma.json", *graphs, *(f"{name}.data" for name in graphs), tokenizer.get("vocab"), tokenizer.get("file")}


def _publish(stage: Path, out: Path) -> None:
    """Move a finished export from ``stage`` into ``out``, replacing an earlier export there whole
    (its tower graphs and harma.json go first, so no graph outlives its description)."""
    from .families import HF_TOKENIZER_FILE

    # the earlier export's tokenizer file too, when its harma.json lists it: an image-only export
    # left it behind, unlisted, and check_out_dir then refused the next text export as foreign
    tokenizers = {VOCAB_FILE, HF_TOKENIZER_FILE} & _earlier_export_files(out)
    graphs = (*TOWER_FILES.values(), *(f"{n}.data" for n in TOWER_FILES.values()))
    for name in ("harma.json", *graphs, *sorted(tokenizers)):
        (out / name).unlink(missing_ok=True)
    files = [f for f in stage.iterdir() if f.is_file()]
    for f in sorted(files, key=lambda f: f.name == "harma.json"):  # the description last
        os.replace(f, out / f.name)


def _remove_abandoned_stages(out: Path) -> None:
    """Scratch folders of exports whose process is gone (killed mid-export): ``.export-<pid>-*``."""
    for stage in out.glob(".export-*-*"):
        pid = stage.name.split("-")[1]
        if not (stage.is_dir() and pid.isdigit()):
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(stage, ignore_errors=True)
        except OSError:  # it exists but is another user's: not ours to judge
            pass


def opset_range() -> Tuple[int, int]:
    """The ONNX opsets torch.onnx's exporter writes: it builds opset 18 and converts upwards only
    (a lower request is silently raised to 18), up to the newest it knows."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET
    except ImportError:  # a private module: assume what torch 2.11-2.14 have
        ONNX_MAX_OPSET = 23
    return 18, int(ONNX_MAX_OPSET)


def check_export_options(towers: Sequence[str], dtype: str, opset: Optional[int], batch_size: Optional[int],
                         fused: bool, check_file: Optional[PathLike], image_root: Optional[PathLike],
                         flags: bool = False) -> tuple:
    """Refuse options :func:`export_onnx` cannot honour, before any work (the CLI calls it before
    loading the model, with ``flags``: the messages then name its flags); returns ``towers`` as a tuple."""
    def name(argument: str, flag: str) -> str:
        return flag if flags else argument

    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be 'fp32', 'fp16' or 'int8', got {dtype!r}")
    towers = tuple(towers)
    if not towers or any(t not in TOWER_FILES for t in towers):
        raise ConfigError(f"towers must be a non-empty subset of ('image', 'text'), got {towers!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise ConfigError(f"batch_size must be a positive integer (or None for a free batch axis), got {batch_size!r}")
    int8 = name("dtype='int8'", "--dtype int8")
    if dtype == "int8" and not fused:
        raise ConfigError(f"{int8} quantizes the fused graphs; drop {name('fused=False (--plain-onnx)', '--plain-onnx')}")
    if check_file is not None and (dtype != "int8" or image_root is None or set(towers) != {"image", "text"}):
        raise ConfigError(f"{name('check_file (--check-file)', '--check-file')} judges int8 retrieval: it needs {int8}, "
                          f"both towers and {name('image_root (--image-root)', '--image-root')}")
    low, high = opset_range()
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or not low <= opset <= high):
        raise ConfigError(f"{name('opset', '--opset')} must be an integer from {low} to {high} (what torch {torch.__version__}'s ONNX "
                          f"exporter writes), got {opset!r}; leave it out for the exporter's default")
    return towers


def export_onnx(model: nn.Module, out_dir: PathLike, towers: Sequence[str] = ("image", "text"), dtype: str = "fp32",
                opset: Optional[int] = None, batch_size: Optional[int] = None, model_name: Optional[str] = None,
                check: bool = True, fused: bool = True, check_file: Optional[PathLike] = None,
                image_root: Optional[PathLike] = None, progress: Optional[Callable[[str], None]] = None) -> Dict:
    """Write ``image.onnx``/``text.onnx`` and ``harma.json`` to ``out_dir``; returns the metadata.

    Args:
        model: an open_clip CLIP, patched with HarMA or not (it is not modified).
        towers: which encoders to export. Everything is written to a scratch folder inside
            ``out_dir`` and moved into place only once it passed its checks; an earlier export in
            ``out_dir`` is replaced whole then, and kept as it was if this one fails.
        dtype: ``"fp32"``, ``"fp16"`` (weights and arithmetic; for the CUDA provider) or ``"int8"``
            (dynamic per-channel int8 weights, for the CPU provider). Inputs and outputs stay float32.
        opset: ONNX opset (the exporter's default when None), within :func:`opset_range`.
        batch_size: None (default) for a free batch axis; N fixes every graph to batches of N
            (what CUDA graphs need; :class:`OrtEncoder` pads the last batch and binds fixed buffers).
        model_name: open_clip architecture name, for the tokenizer (defaults to the name
            ``harma_fast.create_model`` recorded on the model).
        check: run :func:`check_parity` and refuse (write nothing) when it fails.
        fused: attention as ONNX Runtime's fused ``com.microsoft.Attention`` (default), or
            standard ONNX ops only (``False``; int8 needs the fused graphs).
        check_file, image_root: an evaluation file (and its image folder); with ``dtype="int8"``,
            retrieval through the int8 graphs must match the fp32 graphs' (``quantize``'s tolerances).
        progress: called with a line saying what step the export is on (e.g. ``print``).
    """
    import open_clip

    from .. import __version__
    from ..patching import is_patched, set_backend

    say = progress or (lambda message: None)
    towers = check_export_options(towers, dtype, opset, batch_size, fused, check_file, image_root)
    check_out_dir(out_dir, towers)
    _check_finite(model)
    check_records = None
    if check_file:  # its records and images read now, not after minutes of export and quantization
        from ..data.annotations import load_eval_records

        check_records = load_eval_records(check_file, image_root, progress=False)
    out = Path(out_dir)
    model_name = model_name or getattr(model, "harma_model_name", None)
    float_dtype = "fp32" if dtype == "int8" else dtype

    # a private CPU copy in the export dtype, on the reference path: the user's model is untouched
    work = copy.deepcopy(model).to("cpu", _DTYPES[dtype]).eval()
    if is_patched(work):
        set_backend(work, "reference")
    from .families import vocab_size

    if is_patched(work):
        from .fold import fold_adapters

        fold_adapters(work, fused)  # each adapter's linear chains multiplied out (export/fold.py)
    if fused:
        from .fuse import fuse_attention

        fuse_attention(work)
    size, mean, std = model_image_spec(work)
    tokenizer = _tokenizer_spec(work, model_name) if "text" in towers else None
    # everything is written to a scratch folder and published only when it passed its checks;
    # int8 graphs are quantized from fp32 graphs in a folder inside it. The output folder is made
    # only now, after everything above that can refuse the model.
    made = [d for d in (out, *out.parents) if not d.exists()]  # the folders this export creates, deepest first
    out.mkdir(parents=True, exist_ok=True)
    stage = None
    export_id = uuid.uuid4().hex  # in harma.json and in every graph, which the runtime compares
    try:
        _remove_abandoned_stages(out)
        stage = Path(tempfile.mkdtemp(prefix=f".export-{os.getpid()}-", dir=out))
        graphs = stage / "fp32" if dtype == "int8" else stage
        graphs.mkdir(exist_ok=True)
        previous = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # the MHA fast path has no ONNX mapping
        try:
            with torch.no_grad():
                for tower in towers:
                    say(f"exporting the {tower} tower ({float_dtype}, {'fused' if fused else 'plain'} attention) "
                        "with torch.onnx (minutes for a ViT-B on a few CPU cores)")
                    path = graphs / TOWER_FILES[tower]
                    if tower == "image":
                        module, name = ImageTower(work, _DTYPES[dtype]), "pixels"
                        example = torch.randn(batch_size or 2, 3, size, size)
                    else:
                        module, name = TextTower(work), "tokens"
                        example = torch.randint(1, min(vocab_size(work), 49406),
                                                (batch_size or 2, int(work.context_length)))
                    _export_tower(module.eval(), example, path, name, opset, batch_size, fused, float_dtype,
                                  export_id)
        finally:
            torch.backends.mha.set_fastpath_enabled(previous)
        if tokenizer:
            from .families import write_tokenizer_files

            for folder in {stage, graphs}:
                write_tokenizer_files(tokenizer, folder, _vocab_path())
        with torch.no_grad():
            embed_dim = int(work.encode_image(torch.zeros(1, 3, size, size, dtype=_DTYPES[dtype])).shape[-1])
        import onnx
        import onnxruntime

        meta = {
            "format": FORMAT, "export_id": export_id, "model": model_name, "embed_dim": embed_dim,
            "towers": {t: TOWER_FILES[t] for t in towers}, "dtype": float_dtype,
            "dynamic_batch": batch_size is None, "batch_size": batch_size,
            "attention": "fused" if fused else "plain",
            "image": {"size": size, "mean": list(mean), "std": list(std), "interpolation": "bicubic", "mode": "RGB"},
            "text": {"context_length": int(work.context_length), "vocab_size": int(vocab_size(work)),
                     "tokenizer": tokenizer},
            "outputs_normalized": True,
            "harma_config": json.loads(work.harma_config.to_json()) if is_patched(work) else None,
            "versions": {"harma_fast": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
                         "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        }
        _write_meta(graphs, meta)
        if check:
            say(f"checking the {float_dtype} graphs against PyTorch with ONNX Runtime")
            meta["parity"] = check_parity(model, graphs)
            _refuse_on_failure(meta["parity"], out, float_dtype)
        if dtype == "int8":
            for tower in towers:
                say(f"quantizing the {tower} tower to int8 (dynamic, per-channel weights)")
                quantize.quantize_tower(graphs / TOWER_FILES[tower], stage / TOWER_FILES[tower])
            meta.update(dtype="int8", quantization={"method": "dynamic", "weights": "QInt8 (7-bit range), per channel",
                                                    "ops": list(quantize.OP_TYPES), "fp32": "patch Conv"})
            meta.pop("parity", None)
            _write_meta(stage, meta)
            if check:
                say("checking the int8 graphs against PyTorch (cosine)")
                meta["parity"] = check_parity(model, stage)
                _refuse_on_failure(meta["parity"], out, "int8")
            if check_file is not None:
                meta["retrieval_check"] = quantize.retrieval_check(graphs, stage, check_file, image_root, say,
                                                                    records=check_records)
                if not meta["retrieval_check"]["ok"]:
                    raise ExportParityError(
                        f"int8 export to {out} changes retrieval on {check_file}: "
                        f"{'; '.join(meta['retrieval_check']['failures'])}. {_NOTHING_WRITTEN.format(out)}; "
                        "export fp32 (--dtype fp32) instead.")
        if graphs != stage:
            shutil.rmtree(graphs)
        _write_meta(stage, meta)
        _publish(stage, out)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # a refused export leaves no trace, not even the folders it made
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return meta


# what a refused export says of the disk (the files were staged in a scratch folder, now removed)
_NOTHING_WRITTEN = "No file was written to {} (an earlier export there is kept)"


def _refuse_on_failure(report: Dict, out: Path, dtype: str) -> None:
    failures = [f"{t} tower at batch {r['batch']}: max abs {r['max_abs']:.2e}, cosine {r['min_cosine']:.6f}"
                for t, rows in report.items() for r in rows if not r["ok"]]
    if failures:
        raise ExportParityError(f"ONNX export to {out} does not match PyTorch ({dtype} tolerance "
                                f"{TOLERANCE[dtype]}): {'; '.join(failures)}. {_NOTHING_WRITTEN.format(out)}.")


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
        row["ok"] = bool(np.isfinite(got).all() and row["min_cosine"] >= tol["min_cosine"]
                         and (tol["max_abs"] is None or row["max_abs"] <= tol["max_abs"]))
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
