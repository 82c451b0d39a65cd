"""Training checkpoints: adapters + optimizer + scheduler + RNG + position, written atomically.

A checkpoint holds no backbone weights (those come from ``--model``/``--pretrained``), only
what training changes; resuming from it continues bit-for-bit on CPU. Loading validates that
the checkpoint belongs to this model and adapter layout before anything is restored.
"""
from __future__ import annotations

import random
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn

from .checkpoints import (adapter_state_dict, architecture, backbone_fingerprint, check_backbone_fingerprint,
                          describe_mismatch, tensor_checksum)
from .config import HarMAConfig
from .errors import CheckpointError
from .io import PathLike, atomic_path, failed_writes_named, require_file

FORMAT = "harma_fast.train/1"


@dataclass
class Position:
    step: int = 0             # optimizer steps taken
    epoch: int = 0            # epoch in progress
    batch: int = 0            # batches of that epoch already consumed
    best_r_mean: float = -1.0
    best_step: int = -1
    validated_step: int = -1  # step of the last validation
    records: Optional[int] = None  # lines of metrics.jsonl written before this checkpoint (None: older file)
    finished: bool = False    # the run ended (test split evaluated); resuming it does nothing
    world: Optional[int] = None  # processes that trained it: the global batch (None: an older checkpoint)
    extra: Dict = field(default_factory=dict)


def rng_state() -> Dict:
    # numpy's key array as a tensor, so checkpoints load with torch.load(weights_only=True)
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: PathLike, model: nn.Module, model_name: str, loss: nn.Module,
                        optimizer: torch.optim.Optimizer, scheduler, position: Position, config: Dict,
                        backbone: Optional[str] = None) -> None:
    """Write a checkpoint atomically, with the backbone's fingerprint and a checksum of everything in it.

    ``backbone`` says where the backbone came from (``--pretrained``, or the run's backbone.pt).
    """
    state = {
        "format": FORMAT, "model_name": model_name, "architecture": architecture(model),
        "harma_config": model.harma_config.to_json(),
        "adapters": {k: v.detach().cpu().clone() for k, v in adapter_state_dict(model).items()},
        "loss": loss.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "position": dict(position.__dict__), "rng": rng_state(), "config": config,
        "backbone_fingerprint": backbone_fingerprint(model), "backbone": backbone,
    }
    state["checksum"] = tensor_checksum(state)
    with atomic_path(path) as tmp, failed_writes_named(path):  # a full disk: one line, the old file kept
        torch.save(state, tmp)


_REMEDY = "Resume from another copy of the checkpoint, or start the run over (--overwrite)."


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < path.stat().st_size


def read_training_state(path: PathLike) -> Dict:
    """A checkpoint's contents, verified; every unreadable file is one :class:`CheckpointError`."""
    path = require_file(path, "checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): a copy or save that did not finish. {_REMEDY}")
    if _is_safetensors(path):
        raise CheckpointError(f"{path} is an adapter file (safetensors), not a training checkpoint (last.pt): give "
                              "it as --adapters (eval, export), or load it with harma_fast.load_adapters")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is not a PyTorch checkpoint (torch.save writes a zip archive; this "
                              f"file is truncated, corrupt or of another kind). {_REMEDY}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "weights only" in reason.lower() or "weights_only" in reason:
            # torch's advice (weights_only=False) would run arbitrary code from the file: never follow it
            reason = "it holds Python objects that harma_fast checkpoints never contain"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a harma_fast checkpoint ({reason}). "
                              f"{_REMEDY}") from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a harma_fast training checkpoint (format {FORMAT!r}); adapter files "
                              "(.safetensors) load with harma_fast.load_adapters")
    if "checksum" not in state:
        warnings.warn(f"checkpoint {path} has no checksum (written by an older harma_fast): its tensors cannot be "
                      "verified", stacklevel=2)
    elif tensor_checksum({k: v for k, v in state.items() if k != "checksum"}) != state["checksum"]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its contents do not match the checksum written with "
                              f"them (a bit flipped on disk or in a copy). {_REMEDY}")
    return state


def load_training_state(path: PathLike, model: nn.Module, model_name: str, loss: nn.Module,
                        optimizer: Optional[torch.optim.Optimizer] = None, scheduler=None,
                        restore_rng: bool = True, check_backbone: bool = True) -> Position:
    """Restore a checkpoint into a patched model (and optimizer/scheduler); validates first.

    ``check_backbone=False`` accepts a model whose backbone differs from the one trained on.
    """
    path = require_file(path, "checkpoint")
    state = read_training_state(path)
    if state["model_name"] != model_name or state["architecture"] != architecture(model):
        raise CheckpointError(f"checkpoint {path} was trained on {state['model_name']} {state['architecture']}, but "
                              f"this run builds {model_name} {architecture(model)}: a checkpoint of another model")
    config = HarMAConfig.from_json(state["harma_config"])
    if config != model.harma_config:
        raise CheckpointError(f"checkpoint {path} has adapters of another layout "
                              f"({config.describe_difference(model.harma_config)})")
    if check_backbone:
        check_backbone_fingerprint(model, state.get("backbone_fingerprint"), f"checkpoint {path}", path,
                                   state.get("backbone"))
    params = adapter_state_dict(model)
    problem = describe_mismatch(params, state["adapters"])
    if problem:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {problem}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["adapters"][name])
    loss.load_state_dict(state["loss"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng:
        set_rng_state(state["rng"])
    known = set(Position.__dataclass_fields__)
    return Position(**{k: v for k, v in state["position"].items() if k in known})
