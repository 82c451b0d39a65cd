"""ONNX export of HarMA encoders and serving them with ONNX Runtime (``harma_fast.export``).

    from harma_fast.export import export_onnx, check_parity, OrtEncoder

Imported lazily: ``import harma_fast`` needs neither onnx nor onnxruntime.
"""
import importlib

_EXPORTS = {
    "export_onnx": ".onnx_export", "check_parity": ".onnx_export", "ExportParityError": ".onnx_export",
    "OrtEncoder": ".runtime", "read_metadata": ".runtime", "ExportFileError": ".runtime", "ExportDirError": ".runtime",
    "BPETokenizer": ".tokenizer",
    "GalleryIndex": ".search", "write_html": ".search",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'harma_fast.export' has no attribute {name!r}")
