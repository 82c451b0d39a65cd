"""Adapter checkpoints (safetensors, adapters only) and import of released HarMA checkpoints."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from .config import HarMAConfig
from .errors import CheckpointError, ConfigError
from .io import PathLike, atomic_path, failed_writes_named, require_file
from .families import _get
from .patching import find_towers, is_patched, patch, unpatch, unwrap

ADAPTER_FORMAT = "harma_fast.adapters/1"
_ADAPTER_MARK = ".harma."


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every adapter parameter of a patched model, each shared tensor once."""
    model = unwrap(model)
    if not is_patched(model):
        raise RuntimeError("model is not patched with HarMA adapters; call harma_fast.patch(model) first")
    return {n: p for n, p in model.named_parameters() if _ADAPTER_MARK in n}


def architecture(model: nn.Module) -> Dict[str, list]:
    """``{tower: [depth, width]}`` (``[depth, width, family]`` for timm and HF blocks): what an
    adapter file must match. open_clip towers keep the two-element form of older files."""
    return {name: [len(t.blocks), t.width] + ([t.family.name] if t.family.name != "open_clip" else [])
            for name, t in find_towers(model).items()}


def non_finite(tensors: Mapping[str, torch.Tensor]) -> List[str]:
    """The names of the floating-point tensors holding NaN or infinite values."""
    return [n for n, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]


def save_adapters(model: nn.Module, path: PathLike, backbone: Optional[str] = None) -> None:
    """Write the adapters (and the config, as metadata) to a safetensors file, atomically.

    The metadata also holds the backbone's fingerprint (:func:`backbone_fingerprint`), so the
    file refuses to load onto another backbone, and a checksum of the tensors, so a corrupt
    file is refused rather than used. ``backbone`` says where the backbone came from (a
    ``--pretrained`` file or tag); it is quoted when the file meets another backbone.
    """
    from safetensors.torch import save_file

    from . import __version__

    model = unwrap(model)
    tensors = {n: p.detach().contiguous().cpu() for n, p in adapter_state_dict(model).items()}
    bad = non_finite(tensors)
    if bad:  # loading refuses such a file: say so now, where the diverged weights come from
        raise CheckpointError(f"not saving {path}: the adapters hold NaN or infinite values in "
                              f"{', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''} (training diverged?)")
    metadata = {"format": ADAPTER_FORMAT, "harma_config": model.harma_config.to_json(),
                "architecture": json.dumps(architecture(model)), "harma_fast_version": __version__,
                "backbone_fingerprint": backbone_fingerprint(model), "checksum": tensor_checksum(tensors)}
    if backbone:
        metadata["backbone"] = str(backbone)
    if _has_float16_backbone(model):  # its fingerprint is a float16 one: say so where it fails to match
        metadata["backbone_dtype"] = "float16"
    with atomic_path(path) as tmp, failed_writes_named(path):  # a full disk: one line, the old file kept
        save_file(tensors, str(tmp), metadata=metadata)


def _read_adapter_file(path: PathLike):
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    path = require_file(path, "adapter file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"adapter file {path} is empty (0 bytes): the copy or the save that wrote it did not "
                              "finish. Use another adapter file (the run's best.safetensors) or train again.")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        import zipfile

        if zipfile.is_zipfile(path):  # what torch.save writes: a training checkpoint such as last.pt
            raise CheckpointError(f"adapter file {path} is a PyTorch checkpoint, not a safetensors adapter file: "
                                  "for a training checkpoint (last.pt) use --checkpoint (harma-fast eval), or its "
                                  "run's best.safetensors / final.safetensors; for a checkpoint of the released "
                                  "HarMA code, --released (Python: load_released_checkpoint)") from err
        raise CheckpointError(f"cannot read adapter file {path}: not a valid safetensors file ({err}); it is "
                              "truncated, corrupt or of another format. Use another adapter file or train "
                              "again.") from err
    if metadata.get("format") != ADAPTER_FORMAT or "harma_config" not in metadata:
        raise CheckpointError(f"{path} is a safetensors file but not a harma_fast adapter file "
                              f"(format {metadata.get('format')!r}, expected {ADAPTER_FORMAT!r})")
    if "checksum" in metadata and tensor_checksum(tensors) != metadata["checksum"]:
        raise CheckpointError(f"adapter file {path} is corrupt: its tensors do not match the checksum written with "
                              "them (a bit flipped on disk or in a copy). Use another copy, or the run's last.pt.")
    bad = non_finite(tensors)  # NaN adapters embed everything as NaN (an export blamed ONNX for it)
    if bad:
        raise CheckpointError(f"adapter file {path} holds NaN or infinite values in {bad[0]} (saved from a diverged "
                              "training run?); use adapters saved before it diverged")
    return path, metadata, tensors


def load_adapters(model: nn.Module, path: PathLike, check_backbone: bool = True) -> nn.Module:
    """Load adapters written by :func:`save_adapters`; patches ``model`` first if needed.

    Validates the checksum, the config, the backbone's architecture and fingerprint and every
    key and shape, naming what differs; nothing is copied unless everything fits.
    ``check_backbone=False`` loads adapters onto a backbone other than the one they were
    trained on (they will not do what they were trained to).
    """
    given, model = model, unwrap(model)  # a wrapper given is returned
    path, metadata, tensors = _read_adapter_file(path)
    config = HarMAConfig.from_json(metadata["harma_config"])
    saved_arch = json.loads(metadata.get("architecture", "{}"))
    arch = architecture(model)
    for tower, shape in saved_arch.items():
        if tower not in arch:
            raise CheckpointError(f"adapter file {path} has adapters for a {tower} tower, which this model "
                                  f"({type(model).__name__}) does not have in a form harma_fast can adapt")
        if arch[tower] != shape:
            raise CheckpointError(f"adapter file {path} was saved from a model whose {tower} tower has "
                                  f"{shape[0]} blocks of width {shape[1]}; this model's has {arch[tower][0]} blocks of "
                                  f"width {arch[tower][1]}{_family_difference(shape, arch[tower])}")
    if check_backbone:
        check_backbone_fingerprint(model, metadata.get("backbone_fingerprint"), f"adapter file {path}", path,
                                   metadata.get("backbone"), saved_float16=metadata.get("backbone_dtype") == "float16")
    patched_here = not is_patched(model)
    if patched_here:
        patch(given, config)  # refuses a DDP wrapper: its adapters would not be synchronised
    elif model.harma_config != config:
        raise CheckpointError(f"adapter file {path} was saved with a different HarMAConfig than this model is "
                              f"patched with ({config.describe_difference(model.harma_config)})")
    try:
        _copy_checked(adapter_state_dict(model), tensors, f"adapter file {path}")
    except BaseException:
        if patched_here:  # leave the model as we found it
            unpatch(model)
        raise
    return given


# --------------------------------------------------------------------------------------------
# integrity: which backbone adapters belong to, and whether a file's tensors are intact
# --------------------------------------------------------------------------------------------
FINGERPRINT_VERSION = "bf16-sample-sha256/1"
_FINGERPRINT_SAMPLES = 4096


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash identifying the frozen backbone weights adapters were trained on.

    Definition (``bf16-sample-sha256/1``): over every floating-point tensor of the model's
    state dict that is not an adapter's (no ``.harma.`` in its name) and has at least two
    dimensions, in sorted name order, SHA-256 of its name, its shape, and up to 4,096 of its
    elements (the flattened tensor at a stride of ``ceil(numel / 4096)``) rounded to bfloat16.
    The first 16 hex digits are kept.

    Same value for the same weights on any device, in float32 or bfloat16 (rounding to bf16
    is idempotent), patched or not, fast path or not; a different initialisation, another
    pretrained checkpoint or any fine-tuning of the backbone changes it. (A float16 copy
    rounds elsewhere and differs: fingerprint the float32 model.) Costs one strided read per
    tensor, milliseconds even for ViT-L.
    """
    digest = hashlib.sha256(FINGERPRINT_VERSION.encode())
    state = model.state_dict()
    for name in sorted(state):
        t = state[name]
        if _ADAPTER_MARK in name or not t.is_floating_point() or t.ndim < 2:
            continue
        flat = t.detach().reshape(-1)
        stride = -(-flat.numel() // _FINGERPRINT_SAMPLES)
        sample = flat[::stride].to("cpu", torch.bfloat16).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_backbone_fingerprint(model: nn.Module, saved: Optional[str], source: str, path: PathLike,
                               saved_backbone: Optional[str] = None, saved_float16: bool = False) -> None:
    """Refuse adapters (``source``) trained on another backbone than ``model``'s; warn if unknown."""
    if saved is None:
        warnings.warn(f"{source} records no backbone fingerprint (written by an older harma_fast): cannot check "
                      "that the model's backbone is the one it was trained on", stacklevel=3)
        return
    ours = backbone_fingerprint(model)
    if saved == ours:
        return
    run_backbone = Path(path).parent / "backbone.pt"
    if saved_backbone:
        fix = f"pass the backbone it was trained on, --pretrained {saved_backbone}"
    elif run_backbone.is_file():
        fix = f"pass the backbone its run saved, --pretrained {run_backbone}"
    else:
        fix = "pass the --pretrained weights it was trained with"
    built = getattr(model, "harma_pretrained", None)
    ours_from = f"built from {built}" if built else "as given"
    if _has_float16_backbone(model) != saved_float16:  # maybe the same backbone: float16 rounds elsewhere than bf16
        wide = "float32 (or bfloat16)"
        saved_as, ours_as = ("float16", wide) if saved_float16 else (wide, "float16")
        raise CheckpointError(
            f"{source} does not match the model's backbone fingerprint ({saved} vs {ours}), but it was saved from a "
            f"{saved_as} model and this model's backbone is {ours_as}, which gives another fingerprint even for the "
            f"same weights: load it into a {saved_as} model (convert after loading), or, if the backbone is the "
            "right one, pass check_backbone=False.")
    raise CheckpointError(
        f"{source} was trained on another backbone: its backbone fingerprint is {saved}, the model's ({ours_from}) "
        f"is {ours}. Evaluating it on this backbone gives meaningless numbers. To fix it, {fix}. To use it anyway, "
        "pass --ignore-backbone-mismatch (Python: check_backbone=False).")


def _has_float16_backbone(model: nn.Module) -> bool:
    return any(p.dtype == torch.float16 for n, p in model.named_parameters() if _ADAPTER_MARK not in n)


def tensor_checksum(value) -> str:
    """SHA-256 (first 16 hex digits) over a nest of dicts/lists of tensors and plain values.

    Tensors contribute their dtype, shape and raw bytes; dict keys are visited in sorted
    order; lists and tuples are the same. Written into every checkpoint and verified on load:
    ``torch.load`` and safetensors read a flipped bit in the data without complaint.
    """
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()[:16]


def _feed(digest, value) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}".encode())
        for key in sorted(value, key=str):
            digest.update(f"K{key!s}".encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"L{len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(f"V{value!r}".encode())


def _family_difference(saved: list, here: list) -> str:
    saved, here = (s[2] if len(s) > 2 else "open_clip" for s in (saved, here))
    return f" (and {here} blocks, where the file's are {saved} blocks)" if saved != here else ""


def _copy_checked(params: Mapping, tensors: Mapping, source: str) -> None:
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise CheckpointError(f"{source} does not fit this model: keys {', '.join(parts)}")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(f"{source} does not fit this model: {name} has shape "
                             f"{tuple(tensors[name].shape)} in the file, {tuple(p.shape)} in the model")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])


# --------------------------------------------------------------------------------------------
# released checkpoints
# --------------------------------------------------------------------------------------------
# Released key suffix (after "<tower>.resblocks.<i>.") -> our key suffix.
_RELEASED_KEYS = (
    (r"gate1", "harma.block_gate"),
    (r"mmadapter\.gate1", "harma.gate"),
    (r"mmadapter\.img_proj_down\.(weight|bias)", r"harma.down.\1"),
    (r"mmadapter\.img_proj_up\.(weight|bias)", r"harma.up.\1"),
    (r"mmadapter\.multihead_attention\.(.+)", r"harma.attn.\1"),
    (r"mmadapter\.BiShareAdapterxx\.gate1", "harma.shared.gate"),
    (r"mmadapter\.BiShareAdapterxx\.(l1|l2)\.(weight|bias)", r"harma.shared.\1.\2"),
    (r"mmadapter\.BiShareAdapterxx\.multihead_attention1\.(.+)", r"harma.shared.attn.\1"),
)
_RELEASED_BLOCK = re.compile(r"^(visual\.transformer|transformer)\.resblocks\.(\d+)\.(gate1|mmadapter\..+)$")


_WRAPPERS = ("model", "state_dict", "module")  # {'model': state}, Lightning's {'state_dict': ...}, DDP's


def _released_state_dict(checkpoint: Mapping) -> Dict[str, torch.Tensor]:
    state = checkpoint
    while True:  # the weights may sit under one or more wrapper keys
        inner = next((state[k] for k in _WRAPPERS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        # DDP's and the HarMA wrapper's, in either order; the wrapper held the CLIP as `model`, and as `clip` in
        # the released code of 2024-05-01 to 05-28 (models/model_retrieval.py)
        while key.startswith(("module.", "model.", "clip.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _released_widths(state: Mapping) -> Dict[str, int]:
    """The adapter widths a released state dict was trained with, read from its weights' shapes."""
    widths = {}
    for key, value in state.items():
        if key.endswith("mmadapter.img_proj_down.weight") and value.ndim == 2:
            widths.setdefault("bottleneck", int(value.shape[0]))
        elif key.endswith("mmadapter.BiShareAdapterxx.l1.weight") and value.ndim == 2:
            widths.setdefault("shared_width", int(value.shape[0]))
    return widths


def _read_released_file(path: Path, source: str):
    """A released checkpoint from disk: a torch.save file, or a safetensors file (any torch version)."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{":  # safetensors: 8-byte header length, then the JSON header
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"cannot read {source}: not a valid safetensors file ({err}); it is truncated "
                                  "or corrupt") from err
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle errors come in many types
        from .models import _unreadable_reason

        # one line: torch's own message for a file that is no checkpoint is nine about weights_only
        why = _unreadable_reason(path, err, "the .pth file the released HarMA code saved")
        if why.startswith("it holds Python objects"):
            # what the released HarMA code writes: {'model': weights, 'config': <ruamel.yaml CommentedMap>}
            found = re.search(r"GLOBAL ([\w.]+)", str(err))
            needs = (f" (it needs the module of {found.group(1)} installed"
                     f"{': pip install ruamel.yaml' if found.group(1).startswith('ruamel.') else ''})") if found else ""
            raise CheckpointError(
                f"cannot read {source}: it holds Python objects besides tensors (the released HarMA code saves its "
                "config object with the weights), which harma_fast does not unpickle (that could run code from the "
                "file). If you trust the file, save its weights alone once: python -c \"import torch; "
                f"torch.save(torch.load({str(path)!r}, weights_only=False)['model'], 'harma_weights.pth')\"{needs}, "
                "and pass harma_weights.pth") from err
        raise CheckpointError(f"cannot read {source}: {why}") from err


def _map_released_key(key: str) -> Optional[str]:
    m = _RELEASED_BLOCK.match(key)
    if not m:
        return None
    tower, index, rest = m.groups()
    for pattern, replacement in _RELEASED_KEYS:
        if re.fullmatch(pattern, rest):
            return f"{tower}.resblocks.{index}.{re.sub(pattern, replacement, rest)}"
    raise ValueError(f"unknown adapter key {key!r} in released checkpoint")


def load_released_checkpoint(model: nn.Module, path_or_state_dict: Union[PathLike, Mapping]) -> Optional[float]:
    """Import a checkpoint in the released HarMA layout (DESIGN §1): backbone, adapters, gates.

    ``model`` is an unpatched open_clip model of the checkpoint's architecture (it is patched
    with ``HarMAConfig.released()``) or one already patched with that layout. Returns the loss
    temperature ``temp`` (also stored as ``model.harma_temperature``), or None if absent.
    """
    model = unwrap(model)
    source = "released checkpoint"
    if isinstance(path_or_state_dict, Mapping):
        checkpoint = path_or_state_dict
    else:
        path = require_file(path_or_state_dict, "released checkpoint")
        source = f"released checkpoint {path}"
        checkpoint = _read_released_file(path, source)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{source} holds a {type(checkpoint).__name__}, not a state dict")
    ours_instead = ("it was written by harma_fast, not by the released HarMA code: pass a training checkpoint "
                    "(last.pt) as --checkpoint, an adapter file (.safetensors) as --adapters (Python: load_adapters)")
    if str(checkpoint.get("format", "")).startswith("harma_fast."):  # a training checkpoint (last.pt)
        raise CheckpointError(f"{source}: {ours_instead}")
    state = _released_state_dict(checkpoint)
    if any(_ADAPTER_MARK in k for k in state) and not any(".mmadapter." in k for k in state):
        raise CheckpointError(f"{source} holds harma_fast's adapter keys (…resblocks.N.harma.*), not the released "
                              f"code's (…resblocks.N.mmadapter.*): {ours_instead}")
    temp = state.pop("temp", None)
    if temp is not None and (temp.numel() != 1 or not temp.is_floating_point()):  # before anything is changed
        raise CheckpointError(f"{source} has a 'temp' (loss temperature) of shape {tuple(temp.shape)} and dtype "
                              f"{temp.dtype}, not one number: it was not written by the released HarMA code")
    mapped, has_shared, has_image_shared = {}, False, False
    for key, value in state.items():
        ours = _map_released_key(key)
        if ours is not None and ".harma.shared." in ours:
            has_shared = True
            has_image_shared |= ours.startswith("visual.")
        mapped[ours or key] = value
    if not any(".harma." in k for k in mapped):
        raise ValueError(f"{source} has no HarMA adapter keys (…resblocks.N.mmadapter.*); "
                         "for a plain CLIP checkpoint use harma_fast.create_model(name, pretrained=path) "
                         "(--pretrained on the command line)")
    if has_image_shared:
        raise ValueError(f"{source} has a shared sub-adapter in the image tower, which the released layout "
                         "does not have; it was not written by the released HarMA code")
    # the widths come from the weights (the released code's are 128 and 64, but it can be trained with others)
    try:
        expected = dataclasses.replace(HarMAConfig.released() if has_shared else HarMAConfig(share="none"),
                                       **_released_widths(state))
    except ConfigError as err:
        raise CheckpointError(f"{source} has adapters of a width harma_fast cannot build with the released "
                              f"layout's 8 heads ({err})") from err
    if not all(_get(model, stack) is not None for stack in ("visual.transformer.resblocks", "transformer.resblocks")):
        # the keys would only be reported as hundreds missing: say which model the file needs
        raise CheckpointError(f"{source} holds an open_clip CLIP (visual.transformer.resblocks, transformer."
                              f"resblocks); the model given is a {type(model).__name__} of another family: build "
                              "it with harma_fast.create_model('ViT-B-32-quickgelu') (the *_geo.yaml configs) or "
                              "'ViT-B-32' (the *_vit.yaml ones)")
    patched_here = not is_patched(model)
    if patched_here:
        patch(model, expected)
    elif dataclasses.replace(model.harma_config, gate_init=expected.gate_init) != expected:
        # (the initial gate value does not matter: the checkpoint sets every gate)
        raise ValueError(f"{source} has the released layout (shared sub-adapter "
                         f"{'in the text tower only' if has_shared else 'absent'}), but the model is patched with "
                         f"{model.harma_config.describe_difference(expected)}; pass it unpatched (it is then "
                         f"patched to fit), or patch it with {expected!r}")
    try:
        _check_fits(model.state_dict(), mapped, source)
        model.load_state_dict(mapped, strict=True)
    except BaseException:
        if patched_here:  # leave the model as we found it
            unpatch(model)
        raise
    model.harma_temperature = float(temp) if temp is not None else None
    return model.harma_temperature


def describe_mismatch(target: Mapping, source: Mapping) -> str:
    """What keeps ``source`` (a state dict) from loading into a model with state ``target``; "" if nothing."""
    missing = sorted(set(target) - set(source))
    unexpected = sorted(set(source) - set(target))
    shapes = [k for k in target if k in source and tuple(target[k].shape) != tuple(source[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatches, e.g. {k}: checkpoint {tuple(source[k].shape)} vs "
                     f"model {tuple(target[k].shape)}")
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} keys the model does not have, e.g. {unexpected[0]}")
    return "; ".join(parts)


def _check_fits(target: Mapping, mapped: Mapping, source: str) -> None:
    problem = describe_mismatch(target, mapped)
    if problem:
        raise ValueError(f"{source} does not fit this model: {problem}")
