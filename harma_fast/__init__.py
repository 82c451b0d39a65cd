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


def _find_checkout_subpackages() -> None:
    """In a source checkout, ``kernels/`` and ``export/`` sit beside this folder; installing maps them
    to ``harma_fast.kernels`` / ``harma_fast.export`` (an editable install too). Python run in the
    repository root imports this folder ahead of any installed copy (``python -m pytest``, ``torchrun -m
    harma_fast.cli``), so after a non-editable ``pip install .`` those two were not found there: map
    them here, as a last resort the installed layouts never reach."""
    import sys
    from importlib.abc import MetaPathFinder
    from importlib.util import spec_from_file_location
    from pathlib import Path

    here = Path(__file__).resolve().parent
    folders = {f"{__name__}.{n}": here.parent / n for n in ("kernels", "export")}
    if (here / "kernels").exists() or not (here.parent / "pyproject.toml").is_file() \
            or not all((f / "__init__.py").is_file() for f in folders.values()):
        return

    class CheckoutFinder(MetaPathFinder):
        def find_spec(self, fullname, path=None, target=None):
            folder = folders.get(fullname)
            if folder is None:
                return None
            return spec_from_file_location(fullname, folder / "__init__.py", submodule_search_locations=[str(folder)])

    if not any(type(f).__name__ == "CheckoutFinder" for f in sys.meta_path):
        sys.meta_path.append(CheckoutFinder())


_find_checkout_subpackages()


# submodules the documentation names as ``harma_fast.<module>.<name>`` (harma_fast.fast.enable_fast_path,
# harma_fast.distributed.sum_gradients_hook, harma_fast.data.transforms...): imported on first use,
# as ``import harma_fast`` alone does not import them
_SUBMODULES = ("checkpoints", "config", "data", "distributed", "evaluate", "export", "fast", "functional",
               "kernels", "losses", "metrics", "models", "modules", "patching", "train")


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'harma_fast' has no attribute {name!r}")


def __dir__():
    return __all__
