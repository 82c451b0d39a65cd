"""Hugging Face CLIP / SigLIP models with open_clip's encode API, from local folders only.

The training loop, evaluation and export call ``model.encode_image(pixels, normalize=True)``,
``model.encode_text(tokens, normalize=True)``, ``model.visual.image_size`` and
``model.context_length``. :func:`with_clip_api` gives a ``transformers`` ``CLIPModel`` or
``SiglipModel`` these by swapping its class for a subclass (no wrapper: state-dict keys,
``save_pretrained`` and the tower paths ``vision_model.encoder.layers`` /
``text_model.encoder.layers`` stay the model's own). Image size, mean and std come from the
folder's ``preprocessor_config.json``; the tokenizer is the folder's own (``tokenizers``
package, no torch needed), padded to the model's context length as its processor does.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, HarmaError
from .mixins import mixed_class

_PROCESSOR_FILE = "preprocessor_config.json"


def is_hf_dir(name: Union[str, Path]) -> bool:
    """A local Hugging Face model folder (a ``config.json`` with a ``model_type``)."""
    path = Path(name)
    if not (path / "config.json").is_file():
        return False
    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


class HFClipAPI:
    """open_clip's encode API on a ``transformers`` CLIP / SigLIP model (mixed in front of its class)."""

    harma_preprocess: Dict

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        features = _pooled(self.get_image_features(pixel_values=images))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        # No attention mask, as open_clip: CLIP's text tower is causal and pools at the first
        # end-of-text token, SigLIP's is trained on max-length padding and pools the last token.
        features = _pooled(self.get_text_features(input_ids=tokens.long()))
        return F.normalize(features, dim=-1) if normalize else features

    def forward(self, image=None, text=None, **kwargs):
        """open_clip's ``model(images, tokens)`` (normalised features), as the training loop calls it;
        with keyword arguments (``input_ids=``, ``pixel_values=``, …) the model's own forward."""
        if kwargs:
            if image is not None or text is not None:
                raise TypeError("pass either open_clip's (image, text) or the Hugging Face keyword arguments")
            return super().forward(**kwargs)
        return {"image_features": self.encode_image(image, normalize=True) if image is not None else None,
                "text_features": self.encode_text(text, normalize=True) if text is not None else None,
                "logit_scale": self.logit_scale.exp()}

    @property
    def visual(self) -> SimpleNamespace:
        """What ``harma_fast.data.transforms.model_image_spec`` reads: size and normalisation."""
        size = self.config.vision_config.image_size
        return SimpleNamespace(image_size=(size, size), preprocess_cfg=self.harma_preprocess)

    @property
    def context_length(self) -> int:
        return int(self.config.text_config.max_position_embeddings)


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def with_clip_api(model: nn.Module, preprocess: Optional[Dict] = None) -> nn.Module:
    """Give a ``transformers`` dual-encoder the encode API, in place; returns it."""
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise ConfigError(f"{type(model).__name__} is not a Hugging Face dual encoder (CLIPModel, SiglipModel): "
                          "it has no get_image_features / get_text_features")
    # Other dual encoders have the same two methods but other semantics: SigLIP 2 reads patch
    # masks and shapes (it crashed as "no attribute 'visual'"), Chinese-CLIP and AltCLIP run a
    # BERT / XLM-R text tower that needs the attention mask open_clip's API does not pass (they
    # trained with wrong text features, their post-norm text blocks silently left out).
    supported = _supported_classes()
    if supported and not isinstance(model, supported):
        raise ConfigError(f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r}) is not "
                          "a Hugging Face model harma_fast supports: CLIPModel and SiglipModel folders only (an "
                          "open_clip SigLIP 2 or EVA goes by its open_clip name)")
    cls = type(model)
    if not isinstance(model, HFClipAPI):
        model.__class__ = mixed_class(cls, HFClipAPI)
    model.harma_preprocess = dict(preprocess or {})
    return model


def _supported_classes() -> tuple:
    try:
        from transformers import CLIPModel, SiglipModel
    except ImportError:  # a model that is no transformers model cannot be either
        return ()
    return CLIPModel, SiglipModel


def _read_json_object(path: Path) -> Dict:
    """A JSON file of a model folder, or a :class:`ConfigError` naming it (not json's own traceback)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"cannot read {path}: {err}; it is damaged (save the model folder again with "
                          "save_pretrained)") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not an object; save the model folder again "
                          "with save_pretrained")
    return data


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_preprocess(folder: Union[str, Path]) -> Dict:
    """``{"mean", "std", "size"}`` from the folder's ``preprocessor_config.json`` (empty if absent)."""
    path = Path(folder) / _PROCESSOR_FILE
    if not path.is_file():
        return {}
    cfg = _read_json_object(path)
    out = {}
    for key, name in (("mean", "image_mean"), ("std", "image_std")):
        if name in cfg:
            value = cfg[name]
            value = [value] * 3 if _is_number(value) else value  # one number for every channel, as HF allows
            if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) for v in value)):
                raise ConfigError(f"{path}: '{name}' is {value!r}; it must be three numbers (one per RGB channel)")
            out[key] = tuple(value)
    size = cfg.get("crop_size") or cfg.get("size")  # CLIP resizes, then crops to crop_size
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if size:
        if not (_is_number(size) and int(size) == size and size > 0):
            raise ConfigError(f"{path}: the image size ('crop_size' or 'size') is {size!r}; it must be a positive "
                              "whole number of pixels")
        out["size"] = int(size)
    return out


def load_hf_model(folder: Union[str, Path]) -> nn.Module:
    """A CLIPModel / SiglipModel from a local folder (``local_files_only``: never downloads)."""
    from transformers import AutoModel

    folder = Path(folder)
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # OSError, ValueError; safetensors' SafetensorError for a cut weights file
        if not isinstance(err, (OSError, ValueError)) and type(err).__name__ != "SafetensorError":
            raise
        raise ConfigError(f"cannot load a Hugging Face model from {folder}: {str(err).splitlines()[0]}") from err
    # what the model's image processor uses where the folder's preprocessor_config.json (or a field
    # of it) is absent: SigLIP's normalises with 0.5, not CLIP's OpenAI mean/std, the fallback of
    # harma_fast.data.transforms (a SigLIP folder without the file was fed CLIP's statistics)
    defaults = _PROCESSOR_DEFAULTS.get(getattr(model.config, "model_type", None), {})
    return with_clip_api(model.eval(), {**defaults, **read_preprocess(folder)})


_PROCESSOR_DEFAULTS = {"siglip": {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}}


def _stored_pad_id(path: Path) -> Optional[int]:
    padding = _read_json_object(path).get("padding")
    pad_id = padding.get("pad_id") if isinstance(padding, dict) else None
    return pad_id if isinstance(pad_id, int) and not isinstance(pad_id, bool) else None


class HFTokenizer:
    """``tokenizer(["a lake", ...]) -> LongTensor (N, context_length)``: the folder's own tokenizer.

    Padding and truncation as the model's processor sets them up: padded with the folder's pad
    token to the context length, cut there keeping the last (end-of-text) token. The ids come
    from ``harma_fast.export.families.TokenizersTokenizer``, the torch-free tokenizer that
    serves ONNX exports, so training and serving tokenize alike.
    """

    def __init__(self, folder: Union[str, Path], context_length: int):
        from .export.families import TokenizersTokenizer

        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConfigError(f"{folder} has no tokenizer.json; save the model's fast tokenizer there "
                              "(AutoTokenizer.from_pretrained(...).save_pretrained(folder))")
        # The pad token as transformers finds it: tokenizer_config.json, else special_tokens_map.json
        # (where older save_pretrained folders keep it), else the padding tokenizer.json stores.
        # SigLIP reads the pads (no mask, pools the last position): the wrong one changes features.
        pad = None
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if pad is None and (folder / name).is_file():
                pad = _read_json_object(folder / name).get("pad_token")
                pad = pad.get("content") if isinstance(pad, dict) else pad
                pad = pad if isinstance(pad, str) else None  # a token, by its text
        stored = _stored_pad_id(path) if pad is None else None  # before the tokenizer drops it
        try:
            self.tokenizer = TokenizersTokenizer(path, context_length, pad_id=0)
        except Exception as err:  # tokenizers raises a bare Exception for a file it cannot parse
            if isinstance(err, HarmaError):  # tokenizers not installed: its own message
                raise
            raise ConfigError(f"cannot read {path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                              "it is damaged or no tokenizers file (save the model's fast tokenizer again: "
                              "AutoTokenizer.from_pretrained(...).save_pretrained(folder))") from err
        pad_id = self.tokenizer.tokenizer.token_to_id(pad) if pad else stored
        self.tokenizer.pad_id = self.pad_id = pad_id if pad_id is not None else 0
        self.context_length = context_length

    def __call__(self, texts: Union[str, Sequence[str]]) -> torch.Tensor:
        return torch.from_numpy(self.tokenizer(texts))


__all__ = ["HFClipAPI", "HFTokenizer", "is_hf_dir", "load_hf_model", "read_preprocess", "with_clip_api"]
