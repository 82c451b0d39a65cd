"""harma_fast.kernels: the Triton kernels (this folder installs under harma_fast only).

In a source checkout, a process whose path holds the repository root (``python -m pytest`` run
there puts it first) would find this folder under the bare name ``kernels``, which is Hugging
Face's kernel hub package: transformers (5.x) checks that that distribution is installed and
then imports ``kernels``, and got this folder instead (ImportError: cannot import name
'CUDAProperties'). Imported under that name, this module steps aside for the installed package.
"""
if __name__ == "kernels":
    import importlib
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    del sys.modules["kernels"]
    try:
        # the import system returns whatever sys.modules holds for the name once this file has run
        importlib.import_module("kernels")
    finally:
        sys.path[:] = _path
