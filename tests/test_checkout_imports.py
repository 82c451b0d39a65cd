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
