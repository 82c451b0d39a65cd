"""The ``harma-fast`` command: train, eval, demo, export, search."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

PRESETS = ("rsitmd-clip", "rsitmd-georsclip", "rsicd-clip", "rsicd-georsclip")


def load_preset(name_or_path: str) -> Dict:
    """A preset's settings, by name (``rsitmd-clip``, ...) or from a YAML file."""
    import yaml

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
    elif name_or_path in PRESETS:
        text = resources.files("harma_fast").joinpath("presets", f"{name_or_path}.yaml").read_text()
    else:
        raise ValueError(f"unknown preset {name_or_path!r}; choose one of {', '.join(PRESETS)} or give a .yaml file")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"preset {name_or_path} is not valid YAML: {err}") from err
    return data


def train_config(args: argparse.Namespace):
    from .train import TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    settings = load_preset(args.preset) if args.preset else {}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} in preset {args.preset}; known: {sorted(known)}")
    for key in known:
        value = getattr(args, key, None)
        if value is not None:
            settings[key] = value
    config = TrainConfig(**settings)
    missing = [k for k in ("train_file", "image_root") if not getattr(config, k)]
    if missing:
        raise ValueError(f"set {', '.join('--' + m.replace('_', '-') for m in missing)} (or use a --preset)")
    return config


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune HarMA adapters (paper recipe)",
                       description="Fine-tune HarMA adapters. A --preset fills every setting; flags override it.")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)}, or a YAML file")
    for flag, kind, text in (
            ("--train-file", str, "training annotations (JSON, one record per caption)"),
            ("--val-file", str, "validation annotations (chooses the best checkpoint)"),
            ("--test-file", str, "test annotations (evaluated once, with the best adapters)"),
            ("--image-root", str, "folder the annotations' image paths are relative to"),
            ("--model", str, "open_clip architecture, e.g. ViT-B-32"),
            ("--pretrained", str, "local checkpoint file or cached open_clip tag"),
            ("--harma", str, "adapter layout: paper | released | none"),
            ("--output-dir", str, "run directory"), ("--epochs", int, "epochs"),
            ("--batch-size", int, "batch per process"), ("--lr", float, "peak learning rate"),
            ("--grad-accum", int, "batches per optimizer step"), ("--clip-grad-norm", float, "clip gradients"),
            ("--resume", str, "continue from a last.pt"), ("--precision", str, "auto | bf16 | fp32"),
            ("--backend", str, "auto | triton | reference"), ("--num-workers", int, "data-loading processes"),
            ("--seed", int, "seed"), ("--max-steps", int, "stop after this many steps"),
            ("--eval-every", int, "validate every N epochs"), ("--save-every", int, "checkpoint every N steps")):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--overwrite", action="store_true", default=None, help="start over in an existing run directory")
    p.add_argument("--no-check-images", dest="check_images", action="store_false", default=None,
                   help="skip decoding every image before training")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="retrieval metrics of a model on an evaluation file")
    p.add_argument("--test-file", required=True, help="evaluation annotations (one record per image)")
    p.add_argument("--image-root", required=True)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--pretrained", help="backbone weights: local file or cached tag")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapters", help="adapter file (.safetensors) from training")
    src.add_argument("--checkpoint", help="training checkpoint (last.pt)")
    src.add_argument("--released", help="checkpoint of the released HarMA code (backbone + adapters)")
    p.add_argument("--harma", default="paper", help="adapter layout of --checkpoint: paper | released | none")
    p.add_argument("--output", help="write the metrics here as JSON")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--precision", default="auto")
    p.add_argument("--backend", default="auto")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="generate synthetic data, train ~2 minutes on CPU, evaluate before and after")
    p.add_argument("--output-dir", help="where data and run go (default: a new temporary folder)")
    p.add_argument("--steps", type=int, help="training steps (default 368, about 2 minutes on 2 CPU cores)")
    p.add_argument("--minutes", type=float, default=10.0, help="stop early after this many minutes (a safety net)")
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harma-fast", description="HarMA adapters for open_clip: train, evaluate, "
                                     "export and serve remote-sensing image-text retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    from .export.cli import add_export_parsers

    add_export_parsers(sub)
    return parser


def run_eval(args: argparse.Namespace) -> Dict:
    import open_clip
    import torch

    from . import create_model, load_adapters, load_released_checkpoint, patch
    from .data.annotations import load_eval_records
    from .data.transforms import eval_transform, model_image_spec
    from .evaluate import evaluate, format_metrics
    from .train import TrainConfig
    from .trainstate import load_training_state

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    records = load_eval_records(args.test_file, args.image_root)
    model = create_model(args.model, args.pretrained)
    if args.adapters:
        load_adapters(model, args.adapters)
    elif args.released:
        load_released_checkpoint(model, args.released)
    elif args.checkpoint:
        from .losses import HarMALoss

        patch(model, TrainConfig(harma=args.harma).harma_config())
        load_training_state(args.checkpoint, model, args.model, HarMALoss(), restore_rng=False)
    model.to(device)
    size, mean, std = model_image_spec(model)
    metrics = evaluate(model, records, eval_transform(size, mean, std), open_clip.get_tokenizer(args.model), device,
                       args.batch_size, 0, precision, args.backend)
    print(format_metrics(metrics, f"{args.test_file}: {len(records.images)} images, {len(records.captions)} captions"))
    if args.output:
        from .io import atomic_path

        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import train

            train(train_config(args))
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "demo":
            from .demo import run_demo

            run_demo(args.output_dir, args.minutes, args.steps, args.seed)
        else:
            return args.handler(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, RuntimeError) as err:
        print(f"harma-fast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
