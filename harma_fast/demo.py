"""``harma-fast demo``: the whole pipeline on CPU in a few minutes, with nothing to download.

Generates the synthetic aerial dataset (RSITMD layout, real loaders), builds a small
random-initialised CLIP (``HarMA-Tiny``), patches it, evaluates on the test split, trains the
adapters for about two minutes, and evaluates again.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Dict, Optional

from .data.synthetic import generate
from .evaluate import format_metrics
from .train import TrainConfig, Trainer


def demo_config(data: Dict[str, Path], output_dir: Path, minutes: Optional[float], max_steps: Optional[int],
                seed: int, progress: bool) -> TrainConfig:
    return TrainConfig(
        train_file=str(data["train"]), val_file=str(data["val"]), test_file=str(data["test"]),
        image_root=str(data["image_root"]), model="HarMA-Tiny", pretrained=None, harma="paper",
        output_dir=str(output_dir), epochs=14, batch_size=64, lr=3e-3, warmup=0.05, num_workers=1,
        eval_batch_size=256, log_every=20, max_minutes=minutes, max_steps=max_steps, precision="fp32",
        seed=seed, overwrite=True, progress=progress)


def run_demo(output_dir: Optional[str] = None, minutes: Optional[float] = 2.0, max_steps: Optional[int] = None,
             seed: int = 0, progress: bool = True, print_fn=print) -> Dict:
    """Returns ``{"before": metrics, "after": metrics, "output_dir": ...}``; prints both tables."""
    out = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="harma_demo_"))
    print_fn(f"writing the synthetic aerial dataset to {out / 'data'} ...")
    data = generate(out / "data", seed=seed)
    trainer = Trainer(demo_config(data, out / "run", minutes, max_steps, seed, progress))
    before = trainer.evaluate(trainer.test_records)
    print_fn(format_metrics(before, "\ntest retrieval before training (random-initialised HarMA-Tiny, fresh adapters)"))
    budget = f"{minutes:g} minutes" if minutes else f"{max_steps} steps"
    print_fn(f"\ntraining the adapters for up to {budget} on CPU ...")
    result = trainer.fit()
    after = result["test"]
    print_fn(format_metrics(before, "\ntest retrieval before training"))
    print_fn(format_metrics(after, "test retrieval after training (adapters chosen on validation)"))
    run = out / "run"
    import json

    query = json.loads(Path(data["test"]).read_text())[0]["caption"][0]  # a caption in the style trained on
    print_fn(f"\nrun directory: {run} (metrics.jsonl, loss.png, mr.png, best.safetensors, backbone.pt)")
    print_fn("serve it with ONNX Runtime:\n"
             f"  harma-fast export --model HarMA-Tiny --pretrained {run / 'backbone.pt'} "
             f"--adapters {run / 'best.safetensors'} --out {out / 'onnx'}\n"
             f"  harma-fast search --onnx {out / 'onnx'} --images {data['image_root']} \"{query}\" "
             f"--html {out / 'search.html'}")
    return {"before": before, "after": after, "output_dir": str(out)}
