"""The README's Quickstart runs as pasted, and the documents point only at files that exist."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart should hold one python block"
    return blocks[0]


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    code = quickstart_block()
    weights = 'harma_fast.create_model("ViT-B-32-quickgelu", pretrained="RS5M_ViT-B-32_RET-2.pt")'
    assert code.count(weights) == 1, "the Quickstart's weights line changed; update this test"
    # nothing can be downloaded here: the same code on a random-initialised small CLIP
    code = code.replace(weights, 'harma_fast.create_model("HarMA-Tiny")').replace('"ViT-B-32"', '"HarMA-Tiny"')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code, "README.md#quickstart", "exec"), scope)  # noqa: S102 - the README is ours
    assert (tmp_path / "adapters.safetensors").stat().st_size > 0
    assert scope["images"].shape[0] == scope["tokens"].shape[0] == scope["image_ids"].shape[0] == 8
    trained = [p for p in scope["model"].parameters() if p.requires_grad]
    assert trained and all(p.grad is not None for p in trained), "the step reached every adapter"


def mentioned_paths(document: Path):
    """Relative link targets and repository paths (``benchmarks/x.py``, ``../shared/y.sh``) of a markdown file."""
    text = document.read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    top = "harma_fast|kernels|export|benchmarks|tests|shared"
    quoted = re.findall(rf"(?<![\w/.])((?:\.\./)*(?:{top})/[\w./-]*\w)", text)
    return sorted({(document.parent / t.split("#")[0]).resolve() if t in links else (ROOT / t).resolve()
                   for t in links + quoted})


@pytest.mark.parametrize("document", ["README.md", "benchmarks/RESULTS.md"])
def test_documents_point_only_at_files_in_the_repository(document):
    paths = mentioned_paths(ROOT / document)
    assert paths, f"{document} mentions no file (the pattern is broken?)"
    missing = [str(p) for p in paths if not p.exists() or ROOT not in (p, *p.parents)]
    assert not missing, f"{document} points at files not in the repository: {missing}"


def readme_commands():
    """Each ``harma-fast``/``torchrun`` command line of the README's bash blocks, continuations joined."""
    text = (ROOT / "README.md").read_text()
    lines = "\n".join(re.findall(r"```bash\n(.*?)```", text, re.S)).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].split() for line in lines if line.startswith(("harma-fast ", "torchrun "))]


def test_readme_eval_and_export_commands_use_adapters_of_a_run_above_on_its_backbone():
    # the dataset section evaluated runs/rsicd/best.safetensors after a --preset rsicd-clip run
    # (which writes runs/rsicd-clip) and without --pretrained (adapters are refused on another backbone)
    import yaml

    runs, checked = set(), 0
    for argv in readme_commands():
        flags = dict(zip(argv, argv[1:]))
        if "train" in argv:
            preset = flags.get("--preset")
            preset = yaml.safe_load((ROOT / "harma_fast" / "presets" / f"{preset}.yaml").read_text()) if preset else {}
            runs.add(flags.get("--output-dir", preset.get("output_dir", "runs/harma")).rstrip("/"))
        elif "--adapters" in flags:
            assert str(Path(flags["--adapters"]).parent) in runs, f"no README run writes {flags['--adapters']}"
            assert "--pretrained" in flags, f"{' '.join(argv)}: the adapters need the backbone they were trained on"
            checked += 1
    assert checked >= 3, "the README's eval/export commands were not found (the pattern is broken?)"
