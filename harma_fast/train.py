"""Fine-tuning HarMA adapters: the paper's recipe (DESIGN §2), on one GPU, several (torchrun), or CPU.

    from harma_fast.train import TrainConfig, train
    result = train(TrainConfig(train_file=..., val_file=..., image_root=..., model="ViT-B-32",
                               pretrained="RS5M_ViT-B-32_RET-2.pt", output_dir="runs/rsitmd"))

AdamW (β 0.9/0.98, eps 1e-8, weight decay 0.04 on matrices), linear schedule with 10% warm-up,
HarMALoss over the gathered batch, bf16 autocast on GPU, gradient accumulation and clipping.
The run directory holds ``config.json``, ``metrics.jsonl``, ``loss.png``/``mr.png``,
``last.pt`` (resume), ``best.safetensors`` (adapters with the best validation mR; the test
split is never used to choose) and, once the run ends, ``final.safetensors`` (the last adapters:
what a run without a validation file has to export or evaluate). Under DDP every rank trains; rank 0 writes and evaluates.

The settings (``TrainConfig``) and how a resumed run reads its own back live in
``harma_fast.trainconfig``; ``TrainConfig`` is importable from here too.

Resuming (``resume=`` a run directory or its ``last.pt``) is idempotent: every checkpoint
records how many metrics records it covers, and the log is cut back to exactly those, so any
sequence of kills and resumes leaves the log one uninterrupted run writes. A run ends by scoring
the test split once and writing a checkpoint marked finished; resuming it does nothing (unless
``epochs``/``max_steps``/``max_minutes`` were raised). A fresh start (``overwrite``, or a run killed
before its first checkpoint) removes the run's own files (``runlog.RUN_FILES``) and nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import filecmp
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoints import adapter_state_dict, load_adapters, save_adapters
from .data.annotations import load_splits
from .data.datasets import EpochBatches, TrainCollate, TrainDataset
from .data.transforms import eval_transform, model_image_spec, train_transform
from .distributed import sum_gradients_hook
from .errors import ConfigError, OutputPathError
from .evaluate import check_backend_runs, evaluate, format_metrics
from .fast import enable_fast_path
from .io import ImageReadError
from .losses import HarMALoss
from .models import create_model, get_tokenizer
from .patching import patch, trainable_parameters
from .progress import bar_wanted
from .runlog import RunLog, check_writable
from .trainconfig import LENGTH_SETTINGS, TrainConfig, resume_checkpoint
from .trainstate import Position, load_training_state, read_training_state, save_training_state




class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last checkpoint on disk is the last good state."""


class RunExistsError(OutputPathError, FileExistsError):
    """The output directory already holds a run, and neither resume nor overwrite was asked for."""


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
# Rank 0 alone checks every image before training and runs each validation while the other ranks
# wait in a collective: on a large dataset that passes NCCL's default 10 minutes, which would end
# the job. (A rank that fails still ends it at once: torchrun stops the others.)
COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def _distributed() -> Tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device != "auto":
        device = torch.device(config.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"device {config.device!r}: this machine has no CUDA GPU that torch can use; "
                                  "use --device auto (or cpu)")
            if device.index is None:  # "cuda": each torchrun process its own GPU, as under auto
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)  # Triton launches on the current device, not on the tensors'
        return device
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _precision(config: TrainConfig, device: torch.device) -> str:
    if config.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if config.precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {config.precision!r}")
    return config.precision


# The loss already covers the gathered batch: summing (not averaging) the ranks' gradients
# gives exactly the single-process gradient (harma_fast.distributed.gather_batch).
_sum_gradients_hook = sum_gradients_hook


def fused_optimizer_ok(params) -> bool:
    """Whether AdamW can run as PyTorch's fused kernels: one launch set for all ~300 adapter
    tensors instead of per-tensor (foreach) ops — every parameter a float CUDA tensor."""
    params = list(params)
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def _optimizer(model: nn.Module, loss: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in list(model.parameters()) + list(loss.parameters()):
        if p.requires_grad:
            # matrices decay; biases, gates and the temperature do not
            (decay if p.ndim >= 2 else no_decay).append(p)
    fused = {"fused": True} if fused_optimizer_ok(decay + no_decay) else {}
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=tuple(config.betas), eps=config.eps, **fused)


def linear_warmup_schedule(optimizer, total_steps: int, warmup_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _features(out) -> Tuple[torch.Tensor, torch.Tensor]:
    if isinstance(out, dict):
        return out["image_features"], out["text_features"]
    return out[0], out[1]


def _missing_parents(folder: Path) -> List[Path]:
    """``folder`` and those of its ancestors that do not exist yet, deepest first."""
    made = []
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    return made


def _with_absolute_paths(settings: Dict) -> Dict:
    """The settings as config.json records them: paths made absolute, so that ``--resume`` from
    another working directory finds the run's data (paths as typed are relative to where it began)."""
    settings = dict(settings)
    for key in ("train_file", "val_file", "test_file", "image_root", "output_dir", "pretrained"):
        value = settings.get(key)
        if value and (key != "pretrained" or Path(value).exists()):  # pretrained may be an open_clip tag
            settings[key] = str(Path(value).absolute())
    return settings


def _not_a_killed_start(out: Path) -> List[str]:
    """What in ``out`` a run killed before its first checkpoint cannot have written (and a restart
    there would delete): trained adapters, a finished run's result, a config.json that is not ours."""
    kept = [name for name in ("best.safetensors", "final.safetensors", "result.json") if (out / name).exists()]
    config = out / "config.json"
    if config.exists():
        try:
            saved = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            saved = None
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        if not (isinstance(saved, dict) and {"train_file", "model"} <= saved.keys() <= fields):
            kept.append("a config.json that is not a harma-fast run's")
    return kept


def _train_data_summary(records, image_root: str) -> Dict:
    """What a run's order of batches is drawn over: the captions' images (relative to the image root,
    so a moved dataset is the same data) and image ids, in file order. Caption texts are left out:
    a fixed typo changes no batch."""
    root = Path(image_root).absolute()
    digest = hashlib.sha256()
    for image, image_id in zip(records.images, records.image_ids):
        image = Path(image).absolute()
        digest.update(f"{image.relative_to(root) if image.is_relative_to(root) else image}\t{image_id}\n".encode())
    return {"captions": len(records), "images": len(set(records.image_ids)), "sha256": digest.hexdigest()}


def _another_runs_files(out: Path, source: Path) -> List[str]:
    """What in ``out`` a resume of the run in ``source`` may not write over: ``out`` is another folder
    and holds another run's checkpoint, results or trained adapters. What an earlier attempt of this
    same resume, killed before its first checkpoint there, leaves (copies of the run's best adapters
    and backbone, its settings, its log) is not counted: the same command again goes on."""
    if not out.is_dir() or not source.is_dir() or out.samefile(source):
        return []
    theirs = [name for name in ("last.pt", "final.safetensors", "result.json") if (out / name).exists()]
    for name in ("best.safetensors", "backbone.pt"):  # the resume itself copies or writes these
        mine, there = source / name, out / name
        if there.exists() and not (mine.is_file() and filecmp.cmp(mine, there, shallow=False)):
            theirs.append(name)
    return theirs + [k for k in _not_a_killed_start(out) if k.startswith("a config.json")]


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig):
        made = _missing_parents(Path(config.output_dir))
        try:
            self._setup(config)
        except BaseException:
            # a refused command leaves the disk as it was: no empty run folder behind it (rank 0 made it)
            for folder in made if getattr(self, "main", False) else []:
                try:
                    folder.rmdir()
                except OSError:  # not empty (another process's files), or already gone
                    break
            raise

    def _setup(self, config: TrainConfig) -> None:
        self.config = config
        self.rank, self.world, local_rank = _distributed()
        self.main = self.rank == 0
        self.device = _device(config, local_rank)
        check_backend_runs(config.backend, self.device)
        self.precision = _precision(config, self.device)
        self.out = Path(config.output_dir)
        if config.resume and config.overwrite:
            raise ConfigError("--resume continues a run and --overwrite starts it over: give one of them")
        self.resume_from = resume_checkpoint(config.resume) if config.resume else None
        if self.main:
            check_writable(self.out)
            if (self.out / "last.pt").exists() and not (config.resume or config.overwrite):
                raise RunExistsError(f"{self.out} already holds a run (last.pt); pass --resume {self.out} to continue "
                                     "it, --overwrite to start over, or another --output-dir")
            # --resume of a folder without last.pt starts over there too (a run killed before its first
            # checkpoint), so it is guarded the same way: a finished run whose last.pt was deleted to
            # save space had its adapters, result and backbone.pt removed by `--resume RUN_DIR`
            kept = [] if (self.resume_from is not None or config.overwrite) else _not_a_killed_start(self.out)
            if kept and config.resume:
                raise RunExistsError(f"--resume {config.resume}: no last.pt to resume from, and {self.out} holds "
                                     f"{', '.join(kept)}, which starting over would remove; pass --overwrite "
                                     "instead of --resume to replace them, or train in another --output-dir")
            if config.resume:
                # resumed into another --output-dir: whatever run is there would be replaced file by file
                source = Path(config.resume) if Path(config.resume).is_dir() else Path(config.resume).parent
                theirs = _another_runs_files(self.out, source)
                if theirs:
                    raise RunExistsError(
                        f"{self.out} already holds {', '.join(theirs)}, which resuming {source} there would replace: "
                        f"resume into the run's own folder (--resume {source} without --output-dir) or into an "
                        f"empty --output-dir, or move those files away first (a run already resumed into "
                        f"{self.out} goes on with --resume {self.out})")
            if kept:
                raise RunExistsError(f"{self.out} holds {', '.join(kept)}, which a new run would remove, and no "
                                     "last.pt to resume from; pass --overwrite to replace them, or another "
                                     "--output-dir")
        self.log = RunLog(self.out, enabled=self.main)
        self.bar_wanted = self.main and bar_wanted(config.progress)
        # where the frozen backbone comes from, recorded with the adapters so a mismatch can say what to pass
        self.backbone_source = config.pretrained or str(self.out / "backbone.pt")

        # data: every file is validated before the model is even built
        check = config.check_images and self.main
        data = load_splits(config.train_file, config.val_file, config.test_file, config.image_root, config.max_words,
                           check, progress=config.progress)  # every file's problems reported at once
        self.train_records, self.val_records, self.test_records = data.train, data.val, data.test

        torch.manual_seed(config.seed)
        self.model = patch(create_model(config.model, config.pretrained), config.harma_config(), config.backend)
        self.model.to(self.device)
        if config.fast not in ("auto", "on", "off"):
            raise ValueError(f"fast must be auto, on or off, got {config.fast!r}")
        self.fast = config.fast == "on" or (config.fast == "auto" and self.device.type == "cuda")
        if self.fast:
            enable_fast_path(self.model)
        self.loss = HarMALoss(config.margin, config.gamma, config.temperature, max_violation=config.max_violation,
                              backend=config.backend, check_finite=False).to(self.device)
        self.tokenizer = get_tokenizer(config.model)  # open_clip's, or a local HF folder's own
        size, mean, std = model_image_spec(self.model)
        self.eval_transform = eval_transform(size, mean, std)
        self.dataset = TrainDataset(self.train_records, train_transform(size, mean, std), config.seed)
        self.batches = EpochBatches(len(self.dataset), config.batch_size * self.world, config.seed, self.rank,
                                    self.world)
        self.steps_per_epoch = len(self.batches) // config.grad_accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"--grad-accum {config.grad_accum} takes {config.grad_accum} batches per optimizer step, "
                              f"and an epoch of {len(self.dataset)} captions holds {len(self.batches)} batch(es) of "
                              f"{config.batch_size * self.world}: lower --grad-accum to at most {len(self.batches)}, "
                              "or --batch-size")
        total = self.steps_per_epoch * config.epochs
        self.optimizer = _optimizer(self.model, self.loss, config)
        self.scheduler = linear_warmup_schedule(self.optimizer, total, max(1, int(config.warmup * total)))
        self.position = Position(world=self.world)
        if self.resume_from is not None:
            self.position = load_training_state(self.resume_from, self.model, config.model, self.loss,
                                                self.optimizer, self.scheduler)
            self._check_world(self.position.world)
            self.position.world = self.world
            self._check_train_data(self.position.extra.get("train_data"))
            self._apply_optimizer_settings()
        self.position.extra["train_data"] = _train_data_summary(self.train_records, config.image_root)
        self.done = self.position.finished and not self._continues_finished_run()
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.ddp.register_comm_hook(None, _sum_gradients_hook)
        self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        # the fast path keeps the step free of host synchronisation: a NaN is looked for at every
        # log line and before every checkpoint, and the first bad step is remembered on the device
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        if self.main and not self.done:
            self._prepare_directory()
            self.log.write_json("config.json", _with_absolute_paths(dataclasses.asdict(config)))
            if config.pretrained is None:
                self._save_backbone()

    def _check_world(self, trained_by: Optional[int]) -> None:
        # batch_size is per process: with another number of processes the global batch, the steps per
        # epoch and the schedule change, and the saved position (batches of the old size) points
        # elsewhere — the run would not continue, it would silently become another one
        if trained_by is not None and trained_by != self.world:
            how = (f"torchrun --nproc-per-node {trained_by} (or as many processes over several nodes)"
                   if trained_by > 1 else "one process (without torchrun)")
            raise ConfigError(f"--resume {self.resume_from}: the run was trained by {trained_by} process(es) "
                              f"(global batch {self.config.batch_size * trained_by}) and this resume runs "
                              f"{self.world}; resume it with {how}, or start a new run in another --output-dir")

    def _check_train_data(self, trained_on: Optional[Dict]) -> None:
        # the saved position (epoch, batches consumed) indexes the order of the training records it was
        # trained on: other records (an edited or replaced --train-file) would not continue the run but
        # silently become another one, with another schedule (steps per epoch) and other batches
        now = _train_data_summary(self.train_records, self.config.image_root)
        if trained_on is None or trained_on == now:  # None: a checkpoint of an older harma_fast
            return
        pos = self.position
        raise ConfigError(
            f"--resume {self.resume_from}: the training data differ from the run's ({trained_on['captions']} "
            f"captions of {trained_on['images']} images then, {now['captions']} of {now['images']} now"
            + ("" if (trained_on["captions"], trained_on["images"]) != (now["captions"], now["images"]) else
               ", other images or another order") + f"), and the saved position (epoch {pos.epoch + 1}, batch "
            f"{pos.batch}) points into the run's own order; resume with the data the run was trained on (its "
            "config.json records the paths), or start a new run in another --output-dir")

    def _apply_optimizer_settings(self) -> None:
        """After a resume, the optimizer runs with this run's settings (the flags given, as config.json
        records them), not with the ones its saved state carries: ``load_state_dict`` restores the saved
        lr, betas, eps and weight decay, so ``--resume --lr`` was recorded and silently not used. The
        schedule goes on from the step reached, scaled to the peak lr given; unchanged settings give
        back exactly the saved values (an exact resume stays bit-identical)."""
        config, scheduler = self.config, self.scheduler
        before = scheduler.base_lrs[0]
        for group, decay in zip(self.optimizer.param_groups, (config.weight_decay, 0.0)):
            group.update(initial_lr=config.lr, betas=tuple(config.betas), eps=config.eps, weight_decay=decay)
        scheduler.base_lrs = [config.lr] * len(self.optimizer.param_groups)
        for group, factor in zip(self.optimizer.param_groups, scheduler.lr_lambdas):
            group["lr"] = config.lr * factor(scheduler.last_epoch)  # what LambdaLR computes
        scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        if before != config.lr:
            self._say(f"--resume: peak lr {before:g} -> {config.lr:g} from step {self.position.step} on")

    # -- the run directory -------------------------------------------------------------------
    def _prepare_directory(self) -> None:
        """Called once everything is validated, so a failing command leaves the directory as it was."""
        leftovers = self.log.temp_files()  # partial writes of a killed run: up to a whole checkpoint each
        self.log.remove(leftovers)
        if self.resume_from is not None:
            source = RunLog(self.resume_from.parent)
            if self.position.records is not None and source.metrics_path.exists() and not (
                    self.log.metrics_path.exists() and self.log.metrics_path.samefile(source.metrics_path)):
                # resumed into another --output-dir: the log comes along, cut to what the checkpoint covers,
                # so the new folder's log (and plots) is the whole run's, and a kill there resumes exactly
                self.log.rewrite(source.records()[:self.position.records])
            elif self.position.records is not None:
                self.log.keep_first(self.position.records)  # exactly what the checkpoint covers
            else:
                self.log.truncate_after(self.position.step)
            self._bring_best_along()
            return
        stale = self.log.run_files()
        if stale:
            # --overwrite, or a run killed before its first checkpoint: nothing there can be resumed
            why = "--overwrite" if self.config.overwrite else "no checkpoint to resume from"
            self._say(f"starting over in {self.out} ({why}): removing {', '.join(p.name for p in stale)}")
            self.log.remove(stale)

    def _bring_best_along(self) -> None:
        """Resumed into another --output-dir: the adapters validation chose so far come along, so the
        new folder's best.safetensors (and the test scored with it) is the run's best, not a later one."""
        source = self.resume_from.parent / "best.safetensors"
        target = self.out / "best.safetensors"
        if self.position.best_step < 0 or not source.is_file() or target.exists() and target.samefile(source):
            return
        from .io import atomic_path

        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)

    def _continues_finished_run(self) -> bool:
        """A finished run trains on only when its length settings changed and leave steps to take."""
        pos, config = self.position, self.config
        before = pos.extra.get("finished_with", {})
        changed = any(getattr(config, k) != before.get(k) for k in LENGTH_SETTINGS)
        more = pos.epoch < config.epochs and not (config.max_steps and pos.step >= config.max_steps)
        if changed and more:
            pos.finished = False
            pos.extra.pop("result", None)
            return True
        return False

    def _say(self, text: str) -> None:
        """A line for the person watching: above the bar when there is one, else plainly to stderr."""
        if not self.main:
            return
        if self.bar_wanted:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # -- checkpoints -------------------------------------------------------------------------
    def _watch_loss(self, total: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(total.detach())
        if not self.fast:
            if bad.item():
                raise TrainingDiverged(
                    f"the loss became {total.item()} at step {step} (epoch {self.position.epoch}); nothing was "
                    f"updated. {self._last_good()}. Lower --lr or check the data.")
            return
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)

    def _check_diverged(self) -> None:
        first = int(self._first_bad.item())
        if first >= 0:
            raise TrainingDiverged(
                f"the loss became non-finite at step {first} (found at step {self.position.step}, before any "
                f"checkpoint was written). {self._last_good()}. Lower --lr or check the data.")

    def save(self) -> None:
        self._check_diverged()
        if self.main:
            self.position.records = self.log.count
            save_training_state(self.out / "last.pt", self.model, self.config.model, self.loss, self.optimizer,
                                self.scheduler, self.position, dataclasses.asdict(self.config),
                                backbone=self.backbone_source)

    def _save_backbone(self) -> None:
        # Randomly initialised weights exist nowhere else: without them the adapters are meaningless.
        # Stock keys only, so `create_model(name, pretrained=".../backbone.pt")` rebuilds this backbone.
        from .io import atomic_path, failed_writes_named

        stock = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if ".harma." not in k}
        with atomic_path(self.out / "backbone.pt") as tmp, failed_writes_named(self.out / "backbone.pt"):
            torch.save(stock, tmp)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, records) -> Dict[str, float]:
        return evaluate(self.model, records, self.eval_transform, self.tokenizer, self.device,
                        self.config.eval_batch_size, 0, self.precision, self.config.backend, self.bar_wanted)

    def _validate(self) -> None:
        if self.val_records is None:
            return
        if self.main:
            metrics = self.evaluate(self.val_records)
            self.log.log({"kind": "eval", "split": "val", "step": self.position.step, "epoch": self.position.epoch,
                          **metrics})
            if metrics["r_mean"] > self.position.best_r_mean:
                self.position.best_r_mean, self.position.best_step = metrics["r_mean"], self.position.step
                save_adapters(self.model, self.out / "best.safetensors", backbone=self.backbone_source)
            self._say(format_metrics(metrics, f"validation after step {self.position.step}"))
        self.position.validated_step = self.position.step
        if self.world > 1:
            dist.barrier()

    # -- training ----------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> Iterator:
        self.batches.set_epoch(epoch, start)
        self.dataset.set_epoch(epoch)
        loader = DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=TrainCollate(self.tokenizer),
                            num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")
        try:
            yield from loader
        except ImageReadError as err:
            # an image that went missing or bad after the up-front check (or with --no-check-images): say
            # what was kept and how to go on; the run's data must stay the same to resume it
            pos = self.position
            then = (f"run the command again with --resume {self.out}" if (self.out / "last.pt").exists()
                    else "run the command again")
            raise ImageReadError(f"{err}. Training stopped in step {pos.step + 1}. {self._last_good()}. Replace "
                                 f"the image (at the same path), then {then}", err.why) from err

    def _step(self, images, tokens, ids, sync: bool):
        images = images.to(self.device, non_blocking=True)
        tokens, ids = tokens.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)
        context = self.ddp.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
        with context:
            with self._autocast():
                image_f, text_f = _features(self.forward(images, tokens))
                # Under autocast open_clip normalises in fp32 (bf16 / fp32 norm = fp32 features). The
                # fused loss gets bf16 on purpose: tensor-core GEMMs with fp32 accumulation, within
                # the bf16 tolerance its tests hold it to; the reference loss gets fp32.
                dtype = torch.bfloat16 if self.fast and self.precision == "bf16" else torch.float32
                image_f, text_f = image_f.to(dtype), text_f.to(dtype)
                out = self.loss(image_f, text_f, ids)
            (out.total / self.config.grad_accum).backward()
        return out

    def fit(self) -> Dict:
        try:
            return self._fit()
        except KeyboardInterrupt as err:  # Ctrl-C: say what was kept and how to go on from it
            kept = self._last_good()
            if (self.out / "last.pt").exists():
                kept += f": the same command with --resume {self.out} goes on from it"
            raise RunInterrupted(kept) from err

    def _fit(self) -> Dict:
        config, pos = self.config, self.position
        if self.done:
            return self._already_finished()
        total = self.steps_per_epoch * config.epochs
        self._say(f"{config.model}: {trainable_parameters(self.model, self.loss)}; {len(self.train_records)} "
                  f"captions, {self.steps_per_epoch} steps/epoch x {config.epochs} epochs on {self.device} "
                  f"({self.precision}, world {self.world})"
                  + (f"; resuming {self.resume_from} at step {pos.step}" if self.resume_from else ""))
        started = time.monotonic()
        stop = False
        window = {"pairs": 0, "time": time.monotonic()}
        bar = tqdm(total=total, initial=pos.step, desc="training", unit="step", disable=not self.bar_wanted,
                   dynamic_ncols=True)
        per_epoch = self.steps_per_epoch * config.grad_accum  # whole accumulation groups only
        while pos.epoch < config.epochs:
            # the budget is looked at before a step, never after: a run resumed at its max_steps takes none
            if self._budget_spent(started):
                stop = True
                break
            if pos.batch < per_epoch:
                step_loss = None  # the step's loss so far: a step starts and ends within one epoch
                for images, tokens, ids in self._loader(pos.epoch, pos.batch):
                    if pos.batch % config.grad_accum == 0 and self._budget_spent(started):
                        stop = True
                        break
                    pos.batch += 1
                    sync = pos.batch % config.grad_accum == 0
                    out = self._step(images, tokens, ids, sync=sync)
                    # every micro-batch's loss, not only the step's last: under --grad-accum a NaN in an
                    # earlier one reaches the summed gradients all the same, and the step would write NaN
                    # adapters (and then a checkpoint of them over the last good one)
                    self._watch_loss(out.total, pos.step + 1)
                    # the step's loss is the mean of its micro-batches' (what its summed gradients are the
                    # gradient of), not the last micro-batch's alone
                    # (without accumulation it is the one loss: no extra kernels per step for it)
                    if config.grad_accum == 1:
                        step_loss = out
                    else:
                        part = [t.detach() / config.grad_accum for t in out]
                        step_loss = part if step_loss is None else [a + b for a, b in zip(step_loss, part)]
                    window["pairs"] += images.shape[0] * self.world
                    if not sync:
                        continue
                    self._optimizer_step(out)
                    bar.update(1)
                    if pos.step % config.log_every == 0 or pos.step == 1:
                        self._log_train(type(out)(*step_loss), window, bar, total)
                    step_loss = None
                    if config.save_every and pos.step % config.save_every == 0:
                        self.save()
                    if pos.batch >= per_epoch:
                        break
                if stop:
                    break
            validating = self.val_records is not None and (
                (pos.epoch + 1) % config.eval_every == 0 or pos.epoch + 1 == config.epochs)
            if validating and not (config.save_every and pos.step % config.save_every == 0):
                self.save()  # the epoch's training on disk first: a validation takes minutes, and can fail
            pos.epoch, pos.batch = pos.epoch + 1, 0
            if validating:
                self._validate()
            self.save()
        bar.close()
        if stop:  # else the log jumps from "step 1/1870" to the test with no word of why it ended early
            # config names, not flags: the demo sets these from its own --steps / --minutes
            budget = (f"max_steps {config.max_steps}" if config.max_steps and pos.step >= config.max_steps
                      else f"max_minutes {config.max_minutes}")
            self._say(f"stopping at step {pos.step} of {total}: {budget} reached (the learning-rate schedule "
                      f"spans all {total}); resuming {self.out} with a larger budget continues the run")
        if stop and self.val_records is not None and pos.validated_step != pos.step:
            self.save()  # as at an epoch end: the steps since the last checkpoint on disk before a validation
            self._validate()
        return self._finish()

    def _optimizer_step(self, out) -> None:
        pos = self.position
        if self.config.clip_grad_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.config.clip_grad_norm)
        self.optimizer.step()
        self.loss.clamp_temperature_()
        self._lr = self.scheduler.get_last_lr()[0]  # this step's; after scheduler.step() it is the next one's
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        pos.step += 1

    def _budget_spent(self, started: float) -> bool:
        config = self.config
        if config.max_steps and self.position.step >= config.max_steps:
            return True
        if not config.max_minutes:
            return False
        spent = (time.monotonic() - started) / 60 >= config.max_minutes
        if self.world > 1:
            # each process has its own clock: one that stopped alone would wait in a collective its
            # peers never join (a hang). Rank 0's clock decides, for all (a sync per step, only
            # under a time budget)
            flag = torch.tensor([1 if spent else 0], device=self.device)
            dist.broadcast(flag, src=0)
            spent = bool(flag.item())
        return spent

    def _last_good(self) -> str:
        """Where a diverged run can be resumed from, for its error message."""
        path = self.out / "last.pt"
        if not path.exists():
            return "No checkpoint was written before it (nothing to resume from)"
        try:
            return f"Last good checkpoint: {path} (step {read_training_state(path)['position']['step']})"
        except Exception as err:  # noqa: BLE001 - this only decorates another error's message
            return f"The checkpoint {path} is unreadable ({err})"

    def _log_train(self, out, window, bar, total: int) -> None:
        self._check_diverged()
        now = time.monotonic()
        rate = window["pairs"] / max(1e-9, now - window["time"])
        window.update(pairs=0, time=now)
        pos = self.position
        record = {"kind": "train", "step": pos.step, "epoch": pos.epoch,
                  "loss": out.total.item(), "contrastive": out.contrastive.item(), "triplet": out.triplet.item(),
                  "lr": self._lr, "temperature": self.loss.temperature.item(),
                  "pairs_per_s": rate}
        self.log.log(record)
        if self.bar_wanted:
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", pairs_s=f"{rate:.0f}")
        else:  # a log read later (a file, a pipe, CI) gets one plain line, not a redrawn bar
            self._say(f"step {pos.step}/{total} epoch {pos.epoch + 1}/{self.config.epochs}: loss {record['loss']:.4f} "
                      f"lr {record['lr']:.2e} {rate:.0f} pairs/s")

    def _finish(self) -> Dict:
        """Score the test split once (with the adapters chosen on validation), then mark the run finished."""
        pos = self.position
        result = {"step": pos.step, "best_val_r_mean": pos.best_r_mean, "best_step": pos.best_step,
                  "output_dir": str(self.out)}
        if self.main and self.test_records is not None:
            chosen = (self.out / "best.safetensors").exists()
            result["test"] = self._test()
            result["test_adapters"] = "best.safetensors" if chosen else "final.safetensors"
            self.log.log({"kind": "eval", "split": "test", "step": pos.step, "best_step": pos.best_step,
                          "adapters": result["test_adapters"], **result["test"]})
            self._say(format_metrics(result["test"], f"test (adapters chosen on validation, step {pos.best_step})"
                                     if chosen else "test (the last step's adapters: no validation chose others)"))
        if self.main:
            save_adapters(self.model, self.out / "final.safetensors", backbone=self.backbone_source)
        best = self.out / "best.safetensors"
        result["adapters"] = str(best if best.exists() else self.out / "final.safetensors")
        self._say(f"adapters: {result['adapters']} ("
                  + ("best on validation" if best.exists() else "the last step's; no validation chose others")
                  + "), for harma-fast eval/export --adapters")
        pos.finished = True
        pos.extra["result"] = result
        pos.extra["finished_with"] = {k: getattr(self.config, k) for k in LENGTH_SETTINGS}
        self.save()  # the last write: a kill before it re-runs the end from the previous checkpoint
        if self.main:
            self.log.write_json("result.json", result)
            self.log.plot()
        return result

    def _test(self) -> Dict[str, float]:
        best = self.out / "best.safetensors"
        if not best.exists():
            return self.evaluate(self.test_records)
        # the last adapters stay in the model (and in last.pt); the best ones are lent for the test
        trained = {k: v.detach().clone() for k, v in adapter_state_dict(self.model).items()}
        load_adapters(self.model, best)
        try:
            return self.evaluate(self.test_records)
        finally:
            with torch.no_grad():
                for k, v in adapter_state_dict(self.model).items():
                    v.copy_(trained[k])

    def _already_finished(self) -> Dict:
        pos = self.position
        result = dict(pos.extra.get("result") or {"step": pos.step, "best_val_r_mean": pos.best_r_mean,
                                                   "best_step": pos.best_step})
        result["output_dir"] = str(self.out)
        self._say(f"{self.out}: the run already finished at step {pos.step}; nothing to do (raise --epochs or "
                  "--max-steps to train further)")
        if self.main and not (self.out / "result.json").exists():  # killed after its last checkpoint
            self.log.write_json("result.json", result)
            self.log.plot()
        return result


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint was kept (the CLI prints it)."""


def train(config: TrainConfig) -> Dict:
    """Run (or resume) a training run; returns the summary also written to ``result.json``."""
    return Trainer(config).fit()


__all__ = ["TrainConfig", "Trainer", "train", "TrainingDiverged", "RunInterrupted", "linear_warmup_schedule"]
