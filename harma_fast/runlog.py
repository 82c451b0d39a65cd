"""A training run's directory: resolved config, metrics as JSON lines, PNG plots."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List

from .io import PathLike, atomic_path


def check_writable(directory: PathLike) -> Path:
    """Create ``directory`` if needed and prove it is writable, before any work is done."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"run directory {directory} is not writable: {err.strerror or err}") from err
    return directory


class RunLog:
    def __init__(self, directory: PathLike, enabled: bool = True):
        self.dir = Path(directory)
        self.enabled = enabled
        self.metrics_path = self.dir / "metrics.jsonl"

    def write_json(self, name: str, data) -> None:
        if self.enabled:
            with atomic_path(self.dir / name) as tmp:
                tmp.write_text(json.dumps(data, indent=2, default=str))

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def records(self) -> List[Dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines a crashed run wrote after its last checkpoint."""
        if self.enabled and self.metrics_path.exists():
            kept = [r for r in self.records() if r.get("step", 0) <= step]
            with atomic_path(self.metrics_path) as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def plot(self) -> None:
        """loss.png (training loss per logged step) and mr.png (validation mR per evaluation)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        train = [r for r in records if r.get("kind") == "train"]
        evals = [r for r in records if r.get("kind") == "eval"]
        if train:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key in ("loss", "contrastive", "triplet"):
                ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            self._save(fig, "loss.png")
        if evals:
            fig, ax = plt.subplots(figsize=(6, 3.5))
            ax.plot([r["step"] for r in evals], [r["r_mean"] for r in evals], marker="o")
            ax.set_xlabel("step")
            ax.set_ylabel("validation mR (%)")
            ax.grid(alpha=0.3)
            fig.tight_layout()
            self._save(fig, "mr.png")

    def _save(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        with atomic_path(self.dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)
