"""A patched model pickles: ``torch.save(model)`` and ``torch.load`` in a fresh interpreter.

Patching swaps in classes made at run time, which pickle could not find by name (PicklingError
on ``torch.save(model)``, and so on everything that pickles a model: multiprocessing, some
checkpoint tools). The loaded model must compute the same function and stay a patched model
(trainable adapters, fast path as it was, ``unpatch`` still restoring the original).
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import harma_fast
from harma_fast.fast import enable_fast_path
from family_models import FAMILIES, SMALL, family_inputs
from helpers import randomize_adapters, sample_inputs, tiny_model

LOAD = textwrap.dedent("""
    import sys, torch, harma_fast
    torch.set_num_threads(int(sys.argv[2]))  # the parent's: another reduction order rounds otherwise
    results = {}
    for name in sys.argv[3:]:
        model = torch.load(f"{sys.argv[1]}/{name}.pt", weights_only=False)
        images, tokens = torch.load(f"{sys.argv[1]}/{name}.inputs.pt")
        with torch.no_grad():
            out = [model.encode_image(images), model.encode_text(tokens)]
        trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        classes = sorted({type(m).__name__ for m in model.modules() if hasattr(m, "_harma_original_class")})
        harma_fast.unpatch(model)
        left = [type(m).__name__ for m in model.modules() if type(m).__name__.startswith("HarMA")]
        results[name] = {"out": out, "trainable": trainable, "classes": classes, "left": left}
    torch.save(results, f"{sys.argv[1]}/results.pt")
""")


def _open_clip_tiny():
    model = tiny_model()
    return model, sample_inputs(model, batch=3)[:2]


def _family(name):
    def build():
        model = FAMILIES[name]()[0]
        return model, family_inputs(model)
    return build


# name: (builder, adapter config, fast path on)
CASES = {"open_clip": (_open_clip_tiny, None, False), "open_clip-fast": (_open_clip_tiny, None, True),
         **{name: (_family(name), SMALL, True) for name in FAMILIES}}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """Every case pickled here and loaded in one fresh interpreter (one start-up for all)."""
    folder, expected = tmp_path_factory.mktemp("pickled"), {}
    for name, (build, config, fast) in CASES.items():
        model, inputs = build()
        harma_fast.patch(model, config) if config else harma_fast.patch(model)
        randomize_adapters(model, seed=5)
        if fast:
            assert enable_fast_path(model) > 0
        with torch.no_grad():
            out = [model.encode_image(inputs[0]), model.encode_text(inputs[1])]
        expected[name] = {"out": out,
                          "trainable": sorted(n for n, p in model.named_parameters() if p.requires_grad),
                          "classes": sorted({type(m).__name__ for m in model.modules()
                                             if hasattr(m, "_harma_original_class")})}
        torch.save(model, folder / f"{name}.pt")
        torch.save(tuple(inputs), folder / f"{name}.inputs.pt")
    subprocess.run([sys.executable, "-c", LOAD, str(folder), str(torch.get_num_threads()), *CASES], check=True)
    return torch.load(folder / "results.pt"), expected


@pytest.mark.parametrize("name", CASES)
def test_a_patched_model_pickles_and_loads_in_a_fresh_interpreter(loaded, name):
    got, expected = loaded[0][name], loaded[1][name]
    for a, b in zip(got["out"], expected["out"]):
        # the same weights and threads give the same numbers; the margin only absorbs a kernel choice
        # another process may make (a wrong or missing weight is off by orders more)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert got["trainable"] == expected["trainable"] and got["classes"] == expected["classes"]
    assert any(c.startswith("HarMA") for c in got["classes"]) and got["left"] == []


def test_a_patched_model_deep_copies_into_the_same_classes():
    model = randomize_adapters(harma_fast.patch(tiny_model()), seed=1)
    twin = copy.deepcopy(model)
    assert [type(m) for m in twin.modules()] == [type(m) for m in model.modules()]
