"""The settings of a training run (:class:`TrainConfig`, every field range-checked) and how a
resumed run gets its own settings back (``--resume`` a run directory or its ``last.pt``)."""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

from .backend import BACKENDS
from .config import HarMAConfig, Rule, above, at_least, check_settings, in_range, one_of
from .errors import ConfigError
from .losses import TEMPERATURE_RANGE
from .trainstate import read_training_state


@dataclass
class TrainConfig:
    """Everything a run needs; presets (``harma_fast/presets/*.yaml``) fill it, flags override."""

    train_file: str = ""
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    image_root: str = ""
    model: str = "ViT-B-32"
    pretrained: Optional[str] = None          # local checkpoint file or cached open_clip tag
    harma: str = "paper"                      # adapter layout: "paper" | "released" | "none" (no S)
    output_dir: str = "runs/harma"
    epochs: int = 10
    batch_size: int = 214                     # per process; the loss sees batch_size x world size
    lr: float = 4e-4
    weight_decay: float = 0.04
    betas: Tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    warmup: float = 0.1                       # fraction of all steps
    grad_accum: int = 1
    clip_grad_norm: Optional[float] = None
    temperature: float = 0.07
    margin: float = 0.2
    gamma: float = 2.0
    max_violation: bool = False
    max_words: int = 30
    precision: str = "auto"                   # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"
    backend: str = "auto"
    fast: str = "auto"                        # frozen-backbone fast path: "auto" (on CUDA) | "on" | "off"
    compile: bool = False                     # torch.compile the model's forward (works with our kernels)
    device: str = "auto"
    num_workers: int = 4
    seed: int = 42
    eval_every: int = 1                       # epochs
    eval_batch_size: int = 256
    log_every: int = 10                       # steps
    save_every: Optional[int] = None          # steps, besides every epoch end
    max_steps: Optional[int] = None           # stop early (the schedule still spans all epochs)
    max_minutes: Optional[float] = None
    resume: Optional[str] = None              # a run directory or its last.pt
    overwrite: bool = False                   # start over: removes the run's own files in output_dir
    check_images: bool = True
    progress: bool = True                     # a progress bar on a terminal; False (or TQDM_DISABLE=1, or
                                              # stderr not a terminal): plain log lines every log_every steps
    extra: Dict = field(default_factory=dict)

    def __post_init__(self):
        self.validate()

    def validate(self) -> "TrainConfig":
        """Type- and range-check every field (lists become tuples); raises ConfigError naming it."""
        check_settings(self, TRAIN_RULES)
        return self

    def harma_config(self) -> HarMAConfig:
        presets = {"paper": HarMAConfig.paper(), "released": HarMAConfig.released(),
                   "none": HarMAConfig(share="none")}
        if self.harma not in presets:
            raise ConfigError(f"harma must be one of {sorted(presets)}, got {self.harma!r}")
        return presets[self.harma]


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


# The range of every checked TrainConfig field (types come from the annotations above).
TRAIN_RULES = {
    "harma": one_of("paper", "released", "none"),
    "epochs": at_least(1), "batch_size": at_least(1), "grad_accum": at_least(1),
    "lr": above(0), "weight_decay": at_least(0), "eps": above(0),
    "betas": Rule(lambda b: all(0 <= x < 1 for x in b), "two numbers in [0, 1)"),
    "warmup": in_range(0, 1), "clip_grad_norm": above(0),
    "temperature": Rule(lambda t: TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1],
                        f"in [{TEMPERATURE_RANGE[0]}, {TEMPERATURE_RANGE[1]}], the range the loss keeps it in"),
    "margin": at_least(0), "gamma": at_least(0), "max_words": at_least(1),
    "precision": one_of("auto", "bf16", "fp32"), "backend": one_of(*BACKENDS), "fast": one_of("auto", "on", "off"),
    "device": Rule(lambda d: d == "auto" or _is_device(d), "auto or a torch device (cpu, cuda, cuda:1, ...)"),
    "num_workers": at_least(0), "eval_every": at_least(1), "eval_batch_size": at_least(1), "log_every": at_least(1),
    "save_every": at_least(1), "max_steps": at_least(1), "max_minutes": above(0), "seed": at_least(0),
}
# YAML 1.1 reads on/off/yes/no as booleans; for ``fast`` they mean the words.
YAML_ALIASES = {"fast": {True: "on", False: "off"}}


# --------------------------------------------------------------------------------------------
# resuming: a run directory or its last.pt, with the run's own settings
# --------------------------------------------------------------------------------------------
LENGTH_SETTINGS = ("epochs", "max_steps", "max_minutes")  # the settings that say when a run is finished


def resume_checkpoint(resume: str) -> Optional[Path]:
    """The checkpoint ``--resume`` names (a run directory or a file); None for a run killed before its first."""
    path = Path(resume)
    if path.is_dir():
        if (path / "last.pt").is_file():
            return path / "last.pt"
        if (path / "config.json").is_file():
            return None
        raise ConfigError(f"--resume {path}: the folder holds no run (no last.pt, no config.json); give a run "
                          "directory or its last.pt")
    if not path.is_file():
        raise ConfigError(f"--resume {path} does not exist; give a run directory or its last.pt")
    return path


# what decides which captions each step sees: changed on resume, the run would not continue but
# silently start to differ (a saved position of 3 batches of 8 read as 3 batches of 16)
EXACT_SETTINGS = ("batch_size", "grad_accum", "seed")


def resumed_config(resume: str, overrides: Optional[Dict] = None, preset: Optional[Dict] = None) -> TrainConfig:
    """The settings of the run ``resume`` (its config.json, else its checkpoint's), ``overrides`` applied.

    ``preset`` (the values of a ``--preset`` given with ``--resume``) does not apply: the run's own
    settings already hold what its preset set; a value that differs is named, not used.
    The resumed run writes the result back to config.json, so what a run last ran with is on record.
    """
    path = Path(resume)
    run_dir = path if path.is_dir() else path.parent
    checkpoint = resume_checkpoint(resume)
    if (run_dir / "config.json").is_file():
        source = run_dir / "config.json"
        try:
            saved = json.loads(source.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"--resume: {source} is not valid JSON ({err}); fix it or resume from the "
                              "checkpoint's own settings by removing it") from err
        if not isinstance(saved, dict):
            raise ConfigError(f"--resume: {source} holds a JSON {type(saved).__name__}, not a run's settings; fix "
                              "it or resume from the checkpoint's own settings by removing it")
    elif checkpoint is None:
        raise ConfigError(f"--resume {resume}: the run has neither a checkpoint nor a config.json")
    else:
        source, saved = checkpoint, dict(read_training_state(checkpoint)["config"])
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - known)
    if unknown:
        raise ConfigError(f"--resume: {source} has settings this harma_fast does not know: {unknown}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    changed = [f"{k} {saved[k]!r} -> {overrides[k]!r}" for k in EXACT_SETTINGS
               if k in overrides and k in saved and overrides[k] != saved[k]]
    if changed and checkpoint is not None:
        raise ConfigError(f"--resume continues the run exactly, which {', '.join(changed)} would not (they decide "
                          "which captions each step sees); drop those flags, or start a new run in another "
                          "--output-dir")
    ignored = sorted(k for k, v in (preset or {}).items()
                     if k in saved and k not in overrides and _differs(v, saved[k]))
    if ignored:
        warnings.warn(f"--resume keeps the run's own settings ({source}); the preset's {', '.join(ignored)} "
                      "differ from them and are not used (pass a flag to change a setting)", stacklevel=2)
    saved.update(overrides)
    if saved.get("betas") is not None:
        saved["betas"] = tuple(saved["betas"])
    saved["resume"] = str(resume)
    saved["overwrite"] = bool(overrides.get("overwrite"))
    if not overrides.get("output_dir"):
        saved["output_dir"] = str(run_dir)
    return TrainConfig(**saved)


def _differs(preset_value, saved_value) -> bool:
    # config.json stores tuples as lists
    as_list = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return as_list(preset_value) != as_list(saved_value)
