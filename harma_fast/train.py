"""Fine-tuning HarMA adapters: the paper's recipe (DESIGN §2), on one GPU, several (torchrun), or CPU.

    from harma_fast.train import TrainConfig, train
    result = train(TrainConfig(train_file=..., val_file=..., image_root=..., model="ViT-B-32",
                               pretrained="RS5M_ViT-B-32_RET-2.pt", output_dir="runs/rsitmd"))

AdamW (β 0.9/0.98, eps 1e-8, weight decay 0.04 on matrices), linear schedule with 10% warm-up,
HarMALoss over the gathered batch, bf16 autocast on GPU, gradient accumulation and clipping.
The run directory holds ``config.json``, ``metrics.jsonl``, ``loss.png``/``mr.png``,
``last.pt`` (resume) and ``best.safetensors`` (adapters with the best validation mR; the test
split is never used to choose). Under DDP every rank trains; rank 0 writes and evaluates.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoints import load_adapters, save_adapters
from .config import HarMAConfig
from .data.annotations import load_eval_records, load_train_records
from .data.datasets import EpochBatches, TrainCollate, TrainDataset
from .data.transforms import eval_transform, model_image_spec, train_transform
from .evaluate import evaluate, format_metrics
from .fast import enable_fast_path
from .losses import HarMALoss
from .models import create_model, get_tokenizer
from .patching import patch, trainable_parameters
from .runlog import RunLog, check_writable
from .trainstate import Position, load_training_state, save_training_state


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
    resume: Optional[str] = None
    overwrite: bool = False
    check_images: bool = True
    progress: bool = True
    extra: Dict = field(default_factory=dict)

    def harma_config(self) -> HarMAConfig:
        presets = {"paper": HarMAConfig.paper(), "released": HarMAConfig.released(),
                   "none": HarMAConfig(share="none")}
        if self.harma not in presets:
            raise ValueError(f"harma must be one of {sorted(presets)}, got {self.harma!r}")
        return presets[self.harma]


class TrainingDiverged(RuntimeError):
    """The loss became NaN/Inf; the last checkpoint on disk is the last good state."""


# --------------------------------------------------------------------------------------------
# set-up
# --------------------------------------------------------------------------------------------
def _distributed() -> Tuple[int, int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    return 0, 1, 0


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
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


def _sum_gradients_hook(state, bucket):
    # The loss already covers the gathered batch: summing (not averaging) the ranks' gradients
    # gives exactly the single-process gradient (harma_fast.distributed.gather_batch).
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _optimizer(model: nn.Module, loss: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in list(model.parameters()) + list(loss.parameters()):
        if p.requires_grad:
            # matrices decay; biases, gates and the temperature do not
            (decay if p.ndim >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=config.lr, betas=tuple(config.betas), eps=config.eps)


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


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, config: TrainConfig):
        self.config = config
        self.rank, self.world, local_rank = _distributed()
        self.main = self.rank == 0
        self.device = _device(config, local_rank)
        self.precision = _precision(config, self.device)
        self.out = Path(config.output_dir)
        if self.main:
            check_writable(self.out)
            if (self.out / "last.pt").exists() and not (config.resume or config.overwrite):
                raise FileExistsError(f"{self.out} already holds a run (last.pt); pass --resume {self.out / 'last.pt'}"
                                      " to continue it, --overwrite to start over, or another --output-dir")
        self.log = RunLog(self.out, enabled=self.main)

        # data: every file is validated before the model is even built
        check = config.check_images and self.main
        self.train_records = load_train_records(config.train_file, config.image_root, config.max_words, check)
        self.val_records = (load_eval_records(config.val_file, config.image_root, config.max_words, check)
                            if config.val_file else None)
        self.test_records = (load_eval_records(config.test_file, config.image_root, config.max_words, check)
                             if config.test_file else None)

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
            raise ValueError(f"{len(self.batches)} batches per epoch cannot fill grad_accum={config.grad_accum}")
        total = self.steps_per_epoch * config.epochs
        self.optimizer = _optimizer(self.model, self.loss, config)
        self.scheduler = linear_warmup_schedule(self.optimizer, total, max(1, int(config.warmup * total)))
        self.position = Position()
        if config.resume:
            self.position = load_training_state(config.resume, self.model, config.model, self.loss, self.optimizer,
                                                self.scheduler)
            self.log.truncate_after(self.position.step)
        self.ddp = self.model
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.ddp.register_comm_hook(None, _sum_gradients_hook)
        self.forward = torch.compile(self.ddp) if config.compile else self.ddp
        # the fast path keeps the step free of host synchronisation: a NaN is looked for at every
        # log line and before every checkpoint, and the first bad step is remembered on the device
        self._first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        if self.main:
            self.log.write_json("config.json", dataclasses.asdict(config))
            if config.pretrained is None:
                self._save_backbone()

    # -- checkpoints -------------------------------------------------------------------------
    def _watch_loss(self, total: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(total.detach())
        if not self.fast:
            if bad.item():
                raise TrainingDiverged(
                    f"the loss became {total.item()} at step {step} (epoch {self.position.epoch}); nothing was "
                    f"updated. Last good checkpoint: {self.out / 'last.pt'} (step {self._checkpoint_step()}). "
                    "Lower --lr or check the data.")
            return
        self._first_bad = torch.where(bad & (self._first_bad < 0), step, self._first_bad)

    def _check_diverged(self) -> None:
        first = int(self._first_bad.item())
        if first >= 0:
            raise TrainingDiverged(
                f"the loss became non-finite at step {first} (found at step {self.position.step}, before any "
                f"checkpoint was written). Last good checkpoint: {self.out / 'last.pt'} (step "
                f"{self._checkpoint_step()}). Lower --lr or check the data.")

    def save(self) -> None:
        self._check_diverged()
        if self.main:
            save_training_state(self.out / "last.pt", self.model, self.config.model, self.loss, self.optimizer,
                                self.scheduler, self.position, dataclasses.asdict(self.config))

    def _save_backbone(self) -> None:
        # Randomly initialised weights exist nowhere else: without them the adapters are meaningless.
        # Stock keys only, so `create_model(name, pretrained=".../backbone.pt")` rebuilds this backbone.
        from .io import atomic_path

        stock = {k: v.detach().cpu() for k, v in self.model.state_dict().items() if ".harma." not in k}
        with atomic_path(self.out / "backbone.pt") as tmp:
            torch.save(stock, tmp)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    # -- evaluation --------------------------------------------------------------------------
    def evaluate(self, records) -> Dict[str, float]:
        return evaluate(self.model, records, self.eval_transform, self.tokenizer, self.device,
                        self.config.eval_batch_size, 0, self.precision, self.config.backend, self.config.progress)

    def _validate(self) -> None:
        if self.val_records is None:
            return
        if self.main:
            metrics = self.evaluate(self.val_records)
            self.log.log({"kind": "eval", "split": "val", "step": self.position.step, "epoch": self.position.epoch,
                          **metrics})
            if metrics["r_mean"] > self.position.best_r_mean:
                self.position.best_r_mean, self.position.best_step = metrics["r_mean"], self.position.step
                save_adapters(self.model, self.out / "best.safetensors")
            if self.config.progress:
                tqdm.write(format_metrics(metrics, f"validation after step {self.position.step}"))
        if self.world > 1:
            dist.barrier()

    # -- training ----------------------------------------------------------------------------
    def _loader(self, epoch: int, start: int) -> DataLoader:
        self.batches.set_epoch(epoch, start)
        self.dataset.set_epoch(epoch)
        return DataLoader(self.dataset, batch_sampler=self.batches, collate_fn=TrainCollate(self.tokenizer),
                          num_workers=self.config.num_workers, pin_memory=self.device.type == "cuda")

    def _step(self, images, tokens, ids, sync: bool):
        images = images.to(self.device, non_blocking=True)
        tokens, ids = tokens.to(self.device, non_blocking=True), ids.to(self.device, non_blocking=True)
        context = self.ddp.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext()
        with context:
            with self._autocast():
                image_f, text_f = _features(self.forward(images, tokens))
                if not self.fast:  # the fused loss takes bf16 features as they are (fp32 accumulation)
                    image_f, text_f = image_f.float(), text_f.float()
                out = self.loss(image_f, text_f, ids)
            (out.total / self.config.grad_accum).backward()
        return out

    def fit(self) -> Dict:
        config, pos = self.config, self.position
        if self.main and config.progress:
            tqdm.write(f"{config.model}: {trainable_parameters(self.model, self.loss)}; {len(self.train_records)} "
                       f"captions, {self.steps_per_epoch} steps/epoch x {config.epochs} epochs on {self.device} "
                       f"({self.precision}, world {self.world})")
        started = time.monotonic()
        stop = False
        window = {"pairs": 0, "time": time.monotonic()}
        bar = tqdm(total=self.steps_per_epoch * config.epochs, initial=pos.step, desc="training", unit="step",
                   disable=not (self.main and config.progress), dynamic_ncols=True)
        per_epoch = self.steps_per_epoch * config.grad_accum  # whole accumulation groups only
        while pos.epoch < config.epochs and not stop:
            micro = 0
            for images, tokens, ids in self._loader(pos.epoch, pos.batch):
                if pos.batch >= per_epoch:
                    break
                micro += 1
                pos.batch += 1
                out = self._step(images, tokens, ids, sync=micro % config.grad_accum == 0)
                window["pairs"] += images.shape[0] * self.world
                if micro % config.grad_accum:
                    continue
                self._watch_loss(out.total, pos.step + 1)
                if config.clip_grad_norm:
                    params = [p for group in self.optimizer.param_groups for p in group["params"]]
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                pos.step += 1
                bar.update(1)
                if pos.step % config.log_every == 0 or pos.step == 1:
                    self._log_train(out, window, bar)
                if config.save_every and pos.step % config.save_every == 0:
                    self.save()
                minutes = (time.monotonic() - started) / 60
                if (config.max_steps and pos.step >= config.max_steps) or (config.max_minutes and
                                                                             minutes >= config.max_minutes):
                    stop = True
                    break
            if not stop:
                pos.epoch, pos.batch = pos.epoch + 1, 0
                if pos.epoch % config.eval_every == 0 or pos.epoch == config.epochs:
                    self._validate()
            self.save()
        bar.close()
        if stop and self.val_records is not None and pos.best_step != pos.step:
            self._validate()
            self.save()
        return self._finish()

    def _checkpoint_step(self) -> str:
        path = self.out / "last.pt"
        if not path.exists():
            return "none written yet"
        return str(torch.load(path, map_location="cpu", weights_only=True)["position"]["step"])

    def _log_train(self, out, window, bar) -> None:
        self._check_diverged()
        now = time.monotonic()
        rate = window["pairs"] / max(1e-9, now - window["time"])
        window.update(pairs=0, time=now)
        record = {"kind": "train", "step": self.position.step, "epoch": self.position.epoch,
                  "loss": out.total.item(), "contrastive": out.contrastive.item(), "triplet": out.triplet.item(),
                  "lr": self.scheduler.get_last_lr()[0], "temperature": self.loss.temperature.item(),
                  "pairs_per_s": rate}
        self.log.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", pairs_s=f"{rate:.0f}")

    def _finish(self) -> Dict:
        result = {"step": self.position.step, "best_val_r_mean": self.position.best_r_mean,
                  "best_step": self.position.best_step, "output_dir": str(self.out)}
        if self.main:
            best = self.out / "best.safetensors"
            if self.test_records is not None:
                if best.exists():  # the test split is only ever evaluated with the adapters chosen on validation
                    load_adapters(self.model, best)
                result["test"] = self.evaluate(self.test_records)
                self.log.log({"kind": "eval", "split": "test", "step": self.position.step, **result["test"]})
                if self.config.progress:
                    tqdm.write(format_metrics(result["test"], "test (adapters chosen on validation)"))
            self.log.write_json("result.json", result)
            self.log.plot()
        return result


def train(config: TrainConfig) -> Dict:
    """Run (or resume) a training run; returns the summary also written to ``result.json``."""
    return Trainer(config).fit()


__all__ = ["TrainConfig", "Trainer", "train", "TrainingDiverged", "linear_warmup_schedule"]
