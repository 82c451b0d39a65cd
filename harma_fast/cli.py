"""The ``harma-fast`` command: train, eval, demo, export, search."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import traceback
import warnings
from importlib import resources
from pathlib import Path
from typing import Dict, List, Optional

from .cliargs import (BACKENDS, HARMA_LAYOUTS, PRECISIONS, HelpFormatter, add_subparser, non_negative_int,
                      positive_float, positive_int)
from .errors import (CORE_PACKAGES, OPTIONAL_PACKAGES, ConfigError, HarmaError, MissingDependencyError,
                     missing_dependency_message)
from .io import check_output_dir, check_output_file, refuse_foreign_file, require_dir, require_file

PRESETS = ("rsitmd-clip", "rsitmd-georsclip", "rsicd-clip", "rsicd-georsclip")


def load_preset(name_or_path: str) -> Dict:
    """A preset's raw settings, by name (``rsitmd-clip``, ...) or from a YAML file."""
    import yaml

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        text = require_file(path, "--preset file").read_text()
    elif name_or_path in PRESETS:
        text = resources.files("harma_fast").joinpath("presets", f"{name_or_path}.yaml").read_text()
    else:
        raise ConfigError(f"unknown preset {name_or_path!r}; choose one of {', '.join(PRESETS)} or give a .yaml file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        # one line naming where (str(err) spans several, and names the file "<unicode string>")
        mark = getattr(err, "problem_mark", None)
        what = " ".join(str(getattr(err, "problem", None) or err).split())
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"preset {name_or_path} is not valid YAML: {what}{where}; fix the file") from err
    return {} if data is None else data


def train_config(args: argparse.Namespace):
    from .config import settings_from_yaml
    from .trainconfig import TRAIN_RULES, YAML_ALIASES, TrainConfig

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    # every preset value is type- and range-checked here, so an error names the file and the key
    preset = (settings_from_yaml(TrainConfig, TRAIN_RULES, load_preset(args.preset), f"preset {args.preset}",
                                 YAML_ALIASES) if args.preset else {})
    for key in ("resume", "overwrite"):
        if key in preset:  # what to do with an existing run is decided per command, never by a shared file
            raise ConfigError(f"preset {args.preset}: {key!r} is not a preset setting; pass --{key} on the command "
                              "line")
    flags = {}
    if getattr(args, "data", None):  # one file with every split; explicit --*-file flags still win
        from .data.command import data_files

        flags.update(data_files(args.data))
    for key in known:
        value = getattr(args, key, None)
        if value is not None:
            flags[key] = value
    if getattr(args, "resume", None):
        # the run's own config.json, which already holds what its preset set; only flags given override it
        from .trainconfig import resumed_config

        return resumed_config(args.resume, flags, preset)
    config = TrainConfig(**{**preset, **flags})
    missing = [k for k in ("train_file", "image_root") if not getattr(config, k)]
    if missing:
        raise ConfigError(f"set {', '.join('--' + m.replace('_', '-') for m in missing)} (or use a --preset)")
    return config


# TrainConfig's defaults, for the help text (a test keeps them equal; importing train.py here
# would load torch for every `--help`)
TRAIN_DEFAULTS = {"model": "ViT-B-32", "harma": "paper", "output_dir": "runs/harma", "epochs": 10, "batch_size": 214,
                  "lr": 4e-4, "grad_accum": 1, "precision": "auto", "backend": "auto", "num_workers": 4,
                  "seed": 42, "eval_every": 1}


def _add_train(sub) -> None:
    p = add_subparser(sub, "train", "fine-tune HarMA adapters (paper recipe)",
                      "Fine-tune HarMA adapters on image-caption data (RSITMD/RSICD layout). A --preset fills "
                      "every setting; flags override it; a setting given by neither takes TrainConfig's "
                      "default, shown below.")
    p.add_argument("--preset", help=f"one of {', '.join(PRESETS)}, or a YAML file of TrainConfig fields")
    p.add_argument("--data", help="one Karpathy/NWPU file with every split (dataset_rsicd.json, dataset_nwpu.json); "
                   "fills --train-file/--val-file/--test-file")
    for flag, kind, text in (
            ("--train-file", str, "training annotations (JSON, one record per caption)"),
            ("--val-file", str, "validation annotations (chooses the best checkpoint)"),
            ("--test-file", str, "test annotations (evaluated once, with the best adapters)"),
            ("--image-root", str, "folder the annotations' image paths are relative to"),
            ("--model", str, "open_clip architecture, e.g. ViT-B-32"),
            ("--pretrained", str, "local checkpoint file or cached open_clip tag (default: random weights)"),
            ("--harma", HARMA_LAYOUTS, "adapter layout"),
            ("--output-dir", str, "run directory"), ("--epochs", positive_int, "epochs"),
            ("--batch-size", positive_int, "batch per process"), ("--lr", positive_float, "peak learning rate"),
            ("--grad-accum", positive_int, "batches per optimizer step"),
            ("--clip-grad-norm", positive_float, "clip the gradient norm to this (default: no clipping)"),
            ("--resume", str, "continue a run: its directory or its last.pt (its config.json fills the settings)"),
            ("--precision", PRECISIONS, "training precision"),
            ("--backend", BACKENDS, "kernels: triton on CUDA under auto"),
            ("--num-workers", non_negative_int, "data-loading processes"),
            ("--seed", non_negative_int, "seed"),
            ("--max-steps", positive_int, "stop after this many steps; the learning-rate schedule still spans --epochs (default: no limit)"),
            ("--eval-every", positive_int, "validate every N epochs"),
            ("--save-every", positive_int, "also checkpoint every N steps (default: at epoch ends only)")):
        key = flag[2:].replace("-", "_")
        if key in TRAIN_DEFAULTS:
            text += f" (default: the preset's, else {TRAIN_DEFAULTS[key]})"
        if isinstance(kind, tuple):
            p.add_argument(flag, choices=kind, help=text)
        else:
            p.add_argument(flag, type=kind, help=text)
    p.add_argument("--overwrite", action="store_true", default=None, help="start over in an existing run directory")
    p.add_argument("--no-check-images", dest="check_images", action="store_false", default=None,
                   help="skip decoding every image before training")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="plain log lines instead of a progress bar (also: TQDM_DISABLE=1, or stderr not a terminal)")


def _eval_split(test_file: str, split: Optional[str]) -> Optional[str]:
    """The split ``eval`` reads, None for a HarMA-layout file (it is one split): a ``--split`` given
    for one would be ignored silently (a user asking for "val" would read test numbers as validation's)."""
    from .data.annotations import splits_in

    if splits_in(test_file) is None:
        if split is not None:
            raise ConfigError(f"--split {split}: {test_file} is in the HarMA layout, one split per file, so it is "
                              "evaluated whole; drop --split, or pass the file of the split you want")
        return None
    return split or "test"


def _add_eval(sub) -> None:
    p = add_subparser(sub, "eval", "retrieval metrics of a model on an evaluation file",
                      "Evaluate image-text retrieval (R@1/5/10 both ways and mR, in percent) of a backbone, "
                      "optionally with trained adapters, on an evaluation file with one record per image.")
    p.add_argument("--test-file", required=True, help="evaluation annotations (one record per image)")
    p.add_argument("--image-root", required=True, help="folder the annotations' image paths are relative to")
    p.add_argument("--split", choices=("train", "val", "test"),
                   help="split of a Karpathy/NWPU file to evaluate (default: test); a HarMA-layout file is "
                        "one split already")
    p.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    p.add_argument("--pretrained", help="backbone weights: local file or cached tag (default: random weights)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--adapters", help="adapter file (.safetensors) from training")
    src.add_argument("--checkpoint", help="training checkpoint (last.pt)")
    src.add_argument("--released", help="checkpoint of the released HarMA code (backbone + adapters); build it "
                     "with the activation its config ran: --model ViT-B-32-quickgelu for the *_geo.yaml "
                     "configs (GeoRSCLIP), ViT-B-32 for *_vit.yaml")
    p.add_argument("--harma", choices=HARMA_LAYOUTS,
                   help="adapter layout of --checkpoint (default: the one the checkpoint records)")
    p.add_argument("--ignore-backbone-mismatch", action="store_true",
                   help="use adapters on a backbone other than the one they were trained on")
    p.add_argument("--output", help="also write the metrics to this JSON file")
    p.add_argument("--batch-size", type=positive_int, default=256, help="images or captions per forward pass")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="bf16 on CUDA under auto, else fp32")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="kernels: triton on CUDA under auto")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars (also: TQDM_DISABLE=1, or stderr not a terminal)")


def _add_demo(sub) -> None:
    p = add_subparser(sub, "demo", "generate synthetic data, train ~2 minutes on CPU, evaluate before and after",
                      "The whole pipeline with nothing to download: writes a small synthetic aerial dataset, "
                      "trains the adapters of a random-initialised HarMA-Tiny on the CPU, and prints the test "
                      "retrieval table before and after training.")
    p.add_argument("--output-dir", help="where data and run go (default: a new temporary folder)")
    p.add_argument("--steps", type=positive_int, help="training steps (default: 368, about 2 minutes on 2 CPU cores; "
                   "the learning-rate schedule spans whole epochs of 46 steps)")
    p.add_argument("--minutes", type=positive_float, default=10.0, help="stop early after this many minutes (a safety net)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the data and the run")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="plain log lines instead of a progress bar (also: TQDM_DISABLE=1, or stderr not a terminal)")
    p.add_argument("--layout", default="harma", choices=("harma", "karpathy", "nwpu"),
                   help="annotation layout the demo trains from (the same synthetic dataset in each)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harma-fast", formatter_class=HelpFormatter,
                                     description="HarMA adapters for open_clip: train, evaluate, export and serve "
                                     "remote-sensing image-text retrieval. `harma-fast <command> --help` describes "
                                     "each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    _add_train(sub)
    _add_eval(sub)
    _add_demo(sub)
    from .data.command import add_data_parser

    add_data_parser(sub)
    from .export.cli import add_export_parsers

    add_export_parsers(sub)
    return parser


def run_eval(args: argparse.Namespace) -> Dict:
    # every path is checked before the model is built or an image read
    require_file(args.test_file, "--test-file")
    require_dir(args.image_root, "--image-root")
    for flag in ("adapters", "checkpoint", "released"):
        if getattr(args, flag):
            require_file(getattr(args, flag), f"--{flag}")
    if args.output:
        check_output_file(args.output, "--output")
        refuse_foreign_file(args.output, "--output", _is_metrics_file, "a metrics file harma-fast eval wrote")

    import torch

    from . import create_model, load_adapters, load_released_checkpoint, patch
    from .models import get_tokenizer
    from .data.annotations import load_eval_records
    from .data.transforms import eval_transform, model_image_spec
    from .evaluate import check_backend_runs, evaluate, format_metrics
    from .trainconfig import TrainConfig
    from .trainstate import load_training_state, read_training_state

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_backend_runs(args.backend, device)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    split = _eval_split(args.test_file, args.split)
    # the weights first (seconds), then every image of the split (minutes on a large one): a
    # wrong checkpoint is named before the images are read
    model = create_model(args.model, args.pretrained)
    if args.adapters:
        load_adapters(model, args.adapters, check_backbone=not args.ignore_backbone_mismatch)
    elif args.released:
        load_released_checkpoint(model, args.released)
    elif args.checkpoint:
        from .losses import HarMALoss

        from .config import HarMAConfig

        layout = (TrainConfig(harma=args.harma).harma_config() if args.harma else
                  HarMAConfig.from_json(read_training_state(args.checkpoint)["harma_config"]))
        patch(model, layout)
        load_training_state(args.checkpoint, model, args.model, HarMALoss(), restore_rng=False,
                            check_backbone=not args.ignore_backbone_mismatch)
    records = load_eval_records(args.test_file, args.image_root, split=split or "test", progress=args.progress)
    model.to(device)
    size, mean, std = model_image_spec(model)
    metrics = evaluate(model, records, eval_transform(size, mean, std), get_tokenizer(args.model), device,
                       args.batch_size, 0, precision, args.backend, args.progress)
    print(format_metrics(metrics, f"{args.test_file}{f' ({split} split)' if split else ''}: "
                                  f"{len(records.images)} images, {len(records.captions)} captions"))
    if args.output:
        from .io import atomic_path

        with atomic_path(args.output) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
    return metrics


def _is_metrics_file(path: Path) -> bool:
    """What ``eval --output`` writes: a small JSON object of recalls with their mean."""
    try:
        return path.stat().st_size < 1 << 16 and "r_mean" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _named_preset_paths(err: Exception, args: argparse.Namespace, config) -> Exception:
    """``err``, saying which of the paths it names the --preset filled in (the user never typed them)."""
    if not args.preset or args.resume:
        return err
    named = {str(p) for p in getattr(err, "paths", ())}
    keys = [k for k in ("train_file", "val_file", "test_file", "image_root")
            if getattr(args, k, None) is None and not (getattr(args, "data", None) and k.endswith("_file"))
            and str(getattr(config, k)) in named]
    if not keys:
        return err
    flags = ", ".join("--" + k.replace("_", "-") for k in keys)
    return ConfigError(f"{err}\n(preset {args.preset} set {flags}: point them at your copy of the data, or give "
                       "one file holding every split as --data)")


def _run(args: argparse.Namespace) -> int:
    if args.command == "train":
        from .data.annotations import AnnotationError
        from .train import train

        config = train_config(args)
        check_output_dir(config.output_dir, "--output-dir")
        try:
            train(config)
        except AnnotationError as err:
            raise _named_preset_paths(err, args, config) from err
    elif args.command == "eval":
        run_eval(args)
    elif args.command == "demo":
        from .demo import run_demo

        if args.output_dir:
            check_output_dir(args.output_dir, "--output-dir")
        run_demo(args.output_dir, args.minutes, args.steps, args.seed, progress=args.progress, layout=args.layout)
    else:
        return args.handler(args)
    return 0


# Expected failures of modules that predate HarmaError (matched only once their module is loaded).
_LEGACY_EXPECTED = (("harma_fast.data.annotations", "AnnotationError"), ("harma_fast.train", "TrainingDiverged"),
                    ("harma_fast.export.onnx_export", "ExportParityError"))


def _raised_by_our_check(err: BaseException) -> bool:
    """A ValueError raised by a ``raise`` statement of harma_fast itself (not deep inside torch or numpy):
    an input check written before HarmaError existed, whose message is meant for the user."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
    return type(err) is ValueError and (module == "harma_fast" or module.startswith("harma_fast."))


def is_expected(err: BaseException) -> bool:
    """Whether ``err`` is a failure the user can fix (bad input, missing file, full disk), not a bug."""
    legacy = tuple(getattr(sys.modules[m], name) for m, name in _LEGACY_EXPECTED if m in sys.modules)
    return isinstance(err, (HarmaError, OSError) + legacy) or _raised_by_our_check(err)


# what a collective raises in the processes left when one process of a torchrun job exits (gloo,
# NCCL): the failure is that process's, reported there; here it is a consequence, not a bug
_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "NCCL communicator was aborted",
              "remote process exited", "Socket Timeout")


def peer_lost(err: BaseException) -> bool:
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return False
    dist_error = getattr(sys.modules.get("torch.distributed"), "DistError", ())
    return isinstance(err, RuntimeError) and (isinstance(err, dist_error) or any(m in str(err) for m in _PEER_LOST))


def _missing_optional(err: BaseException) -> Optional[MissingDependencyError]:
    """A package this command needs (torch, onnx, transformers, ...) that is not installed: the user's to install."""
    top = (getattr(err, "name", None) or "").split(".")[0] if isinstance(err, ModuleNotFoundError) else ""
    # core packages too: in a serving install `train` and the others died in `import torch` as a "bug"
    if top not in OPTIONAL_PACKAGES and top not in CORE_PACKAGES:
        return None
    missing = MissingDependencyError(missing_dependency_message([top], "this command"))
    missing.__cause__, missing.__traceback__ = err, err.__traceback__  # HARMA_FAST_DEBUG shows where
    return missing


def main(argv: Optional[List[str]] = None) -> int:
    """Exit status: 0 done, 2 bad input (one line, no traceback), 1 a bug (traceback), 130 interrupted."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
    args = build_parser().parse_args(argv)
    name = f"harma-fast {args.command}"
    show = warnings.showwarning
    # our warnings are messages to the user, in the same voice as the errors (not file:line: UserWarning)
    warnings.showwarning = lambda message, category, *_, **__: print(f"{name}: warning: {message}", file=sys.stderr)
    try:
        return _run(args)
    except KeyboardInterrupt as err:  # training says which checkpoint it kept (train.RunInterrupted)
        print(f"{name}: interrupted" + (f". {err}" if str(err) else ""), file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`| head`): not an input error
        try:  # nothing more goes to the closed pipe, not even the flush at exit (Python's signal docs)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # stdout is not a file (captured in tests)
            pass
        return 141  # 128 + SIGPIPE, as a shell tool killed by it reports
    except Exception as err:  # noqa: BLE001 - the one place every failure is reported
        err = _missing_optional(err) or err
        if peer_lost(err):
            print(f"{name}: error: another process of this job stopped ({str(err).splitlines()[0][:200]}); its own "
                  "message, above or in its log, says why: fix that and run the job again", file=sys.stderr)
            return 2
        if not is_expected(err):
            traceback.print_exc()
            print(f"{name}: internal error ({type(err).__name__}: {err}). This is a bug in harma-fast, not in "
                  "your input: please report it with the command line and the traceback above.", file=sys.stderr)
            return 1
        if os.environ.get("HARMA_FAST_DEBUG"):
            traceback.print_exc()
        print(f"{name}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = show


if __name__ == "__main__":
    sys.exit(main())
