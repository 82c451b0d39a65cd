"""harma_fast.kernels: the Triton kernels (this folder installs under harma_fast only).

In a source checkout, a process whose path holds the repository root (``python -m pytest`` run
there puts it first) would find this folder under the bare name ``kernels``, which is Hugging
Face's kernel hub package: transformers (5.x) checks that that distribution is installed and
then imports ``kernels``, and got this folder instead (ImportError: cannot import name
'CUDAProperties'). Imported under that name, this module steps aside for the installed package,
or, where none is installed (transformers 5.17 does not require it, and imports what it finds),
for an empty namespace package.
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
    except ModuleNotFoundError as err:
        if err.name != "kernels":
            raise
        # not installed (transformers 5.17 does not require it): leave what a folder without
        # __init__.py leaves, an empty namespace package (no __file__, no __version__), which
        # transformers takes for "not installed"; an ImportError here escaped its check and
        # failed every Hugging Face model's import
        import importlib.machinery
        import importlib.util

        sys.modules["kernels"] = importlib.util.module_from_spec(
            importlib.machinery.ModuleSpec("kernels", None, is_package=True))
    finally:
        sys.path[:] = _path
