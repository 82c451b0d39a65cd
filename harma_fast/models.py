"""Building open_clip and Hugging Face models from local weights only: harma_fast never downloads."""
from __future__ import annotations

import difflib
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import nn

from .errors import CheckpointError, ConfigError, InputPathError
from .hf import is_hf_dir
from .io import PathLike

_HF_WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_CONFIG_DIR = Path(__file__).parent / "model_configs"


def register_model_configs() -> None:
    """Make harma_fast's own architectures (``HarMA-Tiny``: tests and the demo) known to open_clip."""
    import open_clip

    if not set(p.stem for p in _CONFIG_DIR.glob("*.json")) <= set(open_clip.list_models()):
        open_clip.add_model_config(_CONFIG_DIR)


def _check_name(name: str) -> None:
    import open_clip

    register_model_configs()
    known = open_clip.list_models()
    if name not in known and Path(name).is_dir():
        # a folder is a Hugging Face model folder or nothing: say what it lacks, not "unknown model"
        config = Path(name) / "config.json"
        if not config.is_file():
            why = "it has no config.json"
        else:
            try:
                data = json.loads(config.read_text())
                why = f"its config.json {'names no model_type' if isinstance(data, dict) else 'is no JSON object'}"
            except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
                why = f"its config.json cannot be read ({err}): it is damaged"
        raise ConfigError(f"{name} is a folder but no Hugging Face model folder: {why}. A CLIPModel or SiglipModel "
                          "folder is what save_pretrained writes (save it again); an open_clip model goes by name")
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"unknown open_clip model {name!r}.{hint} See open_clip.list_models().")


def cached_pretrained_path(name: str, tag: str, cache_dir: Optional[str] = None) -> Optional[Path]:
    """Where open_clip's cache already holds weights ``tag`` of ``name``; None if it does not."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{tag!r} is neither a file nor a known pretrained tag of {name} "
                         f"(known tags: {', '.join(tags) or 'none'})")
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        hub = cfg["hf_hub"]
        # open_clip's convention: "org/model/" means the default file names, else "org/model/file".
        repo_id, names = (hub.rstrip("/"), _HF_WEIGHT_NAMES) if hub.endswith("/") else \
            (os.path.dirname(hub), (os.path.basename(hub),))
        for candidate in names:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.get("url"):
        path = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if path.is_file():
            return path
    return None


def _unreadable_reason(path: Path, err: Exception, wanted: str = "the .pt/.bin/.safetensors weights file of the model") -> str:
    """Why torch could not read ``path``, in the user's terms (torch's own message for a file that
    is no checkpoint at all talks about ``weights_only`` and suggests an unsafe retry)."""
    import zipfile

    with open(path, "rb") as f:
        head = f.read(2)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch.save's zip, or a legacy pickle
        return ("it is not a PyTorch checkpoint (truncated, corrupt or of another format); "
                f"pass {wanted}")
    if "weights only" in str(err).lower():
        return ("it holds Python objects besides tensors, which harma_fast does not unpickle (that "
                "could run code from the file); save its weights alone, e.g. "
                "torch.save(model.state_dict(), 'weights.pt'), or use a .safetensors file")
    return str(err).strip().splitlines()[0]


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's original ``ViT-B-32.pt`` and kin)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/", 1)[-1].startswith("code/") for n in archive.namelist())


def _read_state_dict(path: Path) -> Tuple[dict, bool]:
    """``(state_dict, is_torchscript)`` of a checkpoint file, or a clear error."""
    import open_clip

    try:
        return open_clip.factory.load_state_dict(str(path)), False
    except Exception as err:  # noqa: BLE001 - torch.load raises many types
        try:  # OpenAI's original .pt files are TorchScript archives, which weights_only refuses
            with warnings.catch_warnings():
                # torch.jit.load's deprecation notice: a FutureWarning in torch 2.14, a DeprecationWarning in 2.11
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load")
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        except Exception:  # noqa: BLE001
            raise CheckpointError(f"cannot read checkpoint {path}: {_unreadable_reason(path, err)}") from err
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        return state, True


def load_backbone_file(model: nn.Module, path: PathLike, name: str = "model") -> None:
    """Load an open_clip checkpoint, a plain (or OpenAI TorchScript) state dict, or safetensors, strictly.

    open_clip's loader does the format conversions (position-embedding resizing, old text
    layouts); when it fails, keys and shapes are compared to name what does not fit.
    """
    import open_clip

    from .checkpoints import describe_mismatch

    path = Path(path)
    state, torchscript = _read_state_dict(path)
    problem = describe_mismatch(model.state_dict(), state) if torchscript else ""
    if not problem and torchscript:
        model.load_state_dict(state, strict=True)  # OpenAI keys are open_clip's keys
        return
    if not problem:
        try:
            open_clip.load_checkpoint(model, str(path), strict=True)
            return
        except Exception as err:  # noqa: BLE001 - open_clip asserts, torch raises RuntimeError
            problem = describe_mismatch(model.state_dict(), state) or str(err).strip().splitlines()[-1]
    raise CheckpointError(f"checkpoint {path} does not fit {name}: {problem}.{_not_a_backbone_hint(state)}")


def _not_a_backbone_hint(state: dict) -> str:
    """What a checkpoint given as backbone weights is instead, if it is one of the HarMA kinds."""
    nested = [v for k, v in state.items() if k in ("model", "state_dict") and isinstance(v, dict)]
    keys = [str(k) for d in [state, *nested] for k in d]
    if any("mmadapter" in k for k in keys):
        return (" It is a checkpoint of the released HarMA code (backbone and adapters): pass it as --released "
                "(Python: harma_fast.load_released_checkpoint), without --pretrained.")
    if str(state.get("format", "")).startswith("harma_fast."):
        return (" It is a harma_fast training checkpoint: pass it as --checkpoint, and as --pretrained the backbone "
                "it was trained on.")
    if any(".harma." in k for k in keys):
        return (" It holds harma_fast adapters: pass it as --adapters (Python: harma_fast.load_adapters), and as "
                "--pretrained the backbone they were trained on.")
    return ""


def create_model(name: str, pretrained: Optional[PathLike] = None, device="cpu",
                 precision: str = "fp32", cache_dir: Optional[str] = None) -> nn.Module:
    """An open_clip model, randomly initialised or from local weights, or a local Hugging Face
    CLIP / SigLIP folder with open_clip's encode API; never downloads.

    Args:
        name: open_clip architecture, e.g. ``"ViT-B-32"``, ``"ViT-B-16-SigLIP"``, ``"EVA02-B-16"``;
            or a local folder written by ``transformers``' ``save_pretrained`` (``CLIPModel``,
            ``SiglipModel``: its weights, its ``preprocessor_config.json``, its tokenizer).
        pretrained: None (random weights), a checkpoint file (open_clip checkpoint, plain state
            dict such as GeoRSCLIP's ``RS5M_ViT-B-32_RET-2.pt``, safetensors, or OpenAI
            TorchScript), or an open_clip pretrained tag already in the local cache.
        device, precision: as in ``open_clip.create_model``.
        cache_dir: where to look for cached tagged weights (open_clip's default otherwise).
    """
    import open_clip

    if is_hf_dir(name):
        return _create_hf_model(name, pretrained, device, precision)
    _check_name(name)
    path, quick_gelu = None, False
    if pretrained is not None:
        candidate = Path(pretrained)
        looks_like_path = candidate.suffix or os.sep in str(pretrained) or candidate.exists()
        if candidate.is_file():
            path = candidate
        elif candidate.is_dir():
            raise InputPathError(f"pretrained checkpoint {candidate} is a folder, not a weights file (a Hugging Face "
                                 "model folder goes to --model, with no --pretrained)")
        elif looks_like_path:
            raise InputPathError(f"pretrained checkpoint {candidate} does not exist")
        else:
            path = cached_pretrained_path(name, str(pretrained), cache_dir)
            if path is None:
                raise InputPathError(
                    f"pretrained weights {pretrained!r} for {name} are not in the local cache, and harma_fast never "
                    f"downloads. Fetch them on a machine with internet (open_clip.create_model({name!r}, "
                    f"pretrained={str(pretrained)!r}) fills the cache) and copy the weights file here, then pass its "
                    "path as --pretrained (Python: pretrained=...)")  # the CLI's users have no pretrained= to pass
            # weights trained with QuickGELU (OpenAI's, on configs without "-quickgelu"): open_clip
            # builds such a tag's model with GELU and only warns; the frozen backbone must run the
            # activation its weights were trained with
            quick_gelu = bool(open_clip.get_pretrained_cfg(name, str(pretrained)).get("quick_gelu", False))
    if path is not None and _is_torchscript(path):
        quick_gelu = True  # OpenAI's original TorchScript releases, all trained with QuickGELU
    with _quiet_open_clip():  # it warns "initialized randomly" although the weights come next
        model = open_clip.create_model(name, pretrained=None, device="cpu", precision="fp32",
                                       force_quick_gelu=quick_gelu)
    if path is not None:
        load_backbone_file(model, path, name)
    model.harma_model_name = name  # for the tokenizer at export and evaluation time
    model.harma_pretrained = str(path) if path is not None else None  # quoted if adapters meet the wrong backbone
    return _to(model, device, precision)


def _create_hf_model(folder: PathLike, pretrained: Optional[PathLike], device, precision: str) -> nn.Module:
    from .hf import load_hf_model

    model = load_hf_model(folder)
    if pretrained is not None:  # e.g. a run's backbone.pt: the folder's architecture, other weights
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(f"pretrained checkpoint {path} does not exist")
        state, _ = _read_state_dict(path)
        from .checkpoints import describe_mismatch

        problem = describe_mismatch(model.state_dict(), state)
        if problem:
            raise ValueError(f"checkpoint {path} does not fit the model in {folder}: {problem}")
        model.load_state_dict(state, strict=True)
    model.harma_model_name = str(folder)
    return _to(model, device, precision)


def get_tokenizer(name: str):
    """The tokenizer of a model ``create_model`` builds: ``tokenizer(list_of_str) -> LongTensor (N, L)``.

    A Hugging Face folder's own tokenizer (``tokenizer.json``), else open_clip's for the name.
    """
    import open_clip

    if is_hf_dir(name):
        from transformers import AutoConfig

        from .hf import HFTokenizer

        config = AutoConfig.from_pretrained(str(name), local_files_only=True)
        return HFTokenizer(name, int(config.text_config.max_position_embeddings))
    # known names only: get_model_config would fetch the config of an "hf-hub:" name
    text_cfg = open_clip.get_model_config(name)["text_cfg"] if name in open_clip.list_models() else {}
    if text_cfg and "siglip" in name.lower() and not text_cfg.get("hf_tokenizer_name"):
        # a known name with "siglip" in it: open_clip reads a SentencePiece vocabulary over http on every call
        raise ConfigError(f"the tokenizer of {name} is open_clip's SigLipTokenizer, which downloads its vocabulary "
                          "at run time, and harma_fast never downloads: set text_cfg.hf_tokenizer_name in its "
                          "config to a local tokenizer folder (or a cached Hugging Face name), or rename the "
                          "model without 'siglip' to use CLIP's tokenizer")
    # an HF tokenizer (SigLIP's) from the local cache only, even where HF_HUB_OFFLINE is unset
    offline = {"local_files_only": True} if text_cfg.get("hf_tokenizer_name") else {}
    try:
        return open_clip.get_tokenizer(name, **offline)
    except OSError as err:  # an HF tokenizer (SigLIP) that is not in the local cache
        raise FileNotFoundError(f"the tokenizer of {name} is not in the local Hugging Face cache, and harma_fast "
                                f"never downloads ({str(err).splitlines()[0]}); fetch it on a machine with "
                                "internet (open_clip.get_tokenizer fills the cache)") from err


class _quiet_open_clip:
    class _Drop(logging.Filter):
        def filter(self, record):
            return "No pretrained weights loaded" not in record.getMessage()

    def __enter__(self):
        self.filter = self._Drop()
        for handler in logging.getLogger().handlers:
            handler.addFilter(self.filter)
        logging.getLogger().addFilter(self.filter)

    def __exit__(self, *exc):
        for handler in logging.getLogger().handlers:
            handler.removeFilter(self.filter)
        logging.getLogger().removeFilter(self.filter)
        return False


def _to(model: nn.Module, device, precision: str) -> nn.Module:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    return model.to(device=device, dtype=dtype)
