"""A source checkout must not shadow other packages: the repository root holds kernels/ and
export/, which install as harma_fast.kernels and harma_fast.export only."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernels_folder_steps_aside_for_hugging_faces_kernels_package():
    # transformers 5.x requires the `kernels` distribution and imports it: run from the repository
    # root (as `python -m pytest` is), our kernels/ folder used to be imported in its place
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    script = ("import kernels, harma_fast.kernels.retrieval_ranks as ours\n"
              "print(kernels.__file__); print(ours.__file__)")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, capture_output=True, text=True)
    theirs, ours = out.stdout.split()
    assert Path(theirs).parent != ROOT / "kernels" and Path(ours).parent == ROOT / "kernels"


def test_a_checkout_finds_its_kernels_and_export_without_an_editable_install():
    # after `pip install .` (not -e), Python run in the repository root (python -m pytest, torchrun -m
    # harma_fast.cli) imports harma_fast from the checkout, where harma_fast/kernels and harma_fast/export
    # do not exist: conftest.py and the CLI failed with "No module named 'harma_fast.kernels'".
    # -S: no site-packages, so no installed copy (editable or not) can supply them.
    script = ("import sys; sys.path.insert(0, '.')\n"
              "import harma_fast.kernels, harma_fast.export\n"
              "print(harma_fast.__file__); print(harma_fast.kernels.__file__); print(harma_fast.export.__file__)")
    out = subprocess.run([sys.executable, "-S", "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    package, kernels, export = (Path(p) for p in out.stdout.split())
    assert package.parent == ROOT / "harma_fast"
    assert kernels == ROOT / "kernels" / "__init__.py" and export == ROOT / "export" / "__init__.py"


# As if Hugging Face's kernels package were not installed (transformers 5.17 does not require it):
# its distribution is not found, and the bare name `kernels` is only what the path holds.
WITHOUT_HF_KERNELS = """
import importlib.machinery, importlib.metadata, os, sys
root = sys.argv[1]

class CheckoutOnly:
    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        here = [p for p in sys.path if os.path.abspath(p or os.curdir) == root]
        spec = importlib.machinery.PathFinder.find_spec(name, here) if here else None
        if spec is None:
            raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
        return spec

sys.meta_path.insert(0, CheckoutOnly())
version = importlib.metadata.version
def version_without_kernels(name):
    if name == "kernels":
        raise importlib.metadata.PackageNotFoundError(name)
    return version(name)
importlib.metadata.version = version_without_kernels

from transformers.utils.import_utils import is_kernels_available
assert not is_kernels_available()
from transformers import CLIPModel  # imported ACT2FN, which asks whether kernels is available
import harma_fast.kernels.retrieval_ranks as ours
print(ours.__file__)
"""


def test_the_kernels_folder_is_not_taken_for_hugging_faces_kernels_package_where_that_is_not_installed():
    # transformers finds our folder under the bare name, finds no distribution for it and imports
    # it to read a version: it stepped aside with an ImportError then, which transformers does not
    # catch, so every Hugging Face model failed to import from the repository root
    pytest.importorskip("transformers")
    out = subprocess.run([sys.executable, "-c", WITHOUT_HF_KERNELS, str(ROOT)], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert Path(out.stdout.split()[-1]).parent == ROOT / "kernels"
