"""Datasets, layouts and transforms; submodules load on first use (``harma_fast.data.transforms``)."""
import importlib

_SUBMODULES = ("annotations", "command", "datasets", "layouts", "synthetic", "synthetic_layouts", "transforms")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
