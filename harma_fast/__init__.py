"""harma_fast: HarMA (arXiv 2404.18253) on open_clip, fast and deployable.

    import harma_fast
    model = harma_fast.create_model("ViT-B-32", pretrained="RS5M_ViT-B-32_RET-2.pt")
    harma_fast.patch(model)                      # adapters in every block, backbone frozen
    loss = harma_fast.HarMALoss()                # contrastive + adaptive triplet

Names are imported lazily, so ``import harma_fast`` works without triton or onnx installed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "HarMAConfig": ".config",
    "patch": ".patching",
    "unpatch": ".patching",
    "set_backend": ".patching",
    "is_patched": ".patching",
    "trainable_parameters": ".patching",
    "save_adapters": ".checkpoints",
    "load_adapters": ".checkpoints",
    "load_released_checkpoint": ".checkpoints",
    "create_model": ".models",
    "HarMALoss": ".losses",
    "retrieval_metrics": ".metrics",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harma_fast' has no attribute {name!r}")


def __dir__():
    return __all__
