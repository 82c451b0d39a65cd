"""A training run's directory: resolved config, metrics as JSON lines, PNG plots.

``metrics.jsonl`` only ever grows by whole lines, and every checkpoint records how many lines
existed when it was written: resuming cuts the file back to exactly that many, so after any
sequence of kills and resumes it holds what one uninterrupted run would have written.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .errors import OutputPathError
from .io import PathLike, atomic_path

# Everything a run writes into its directory; --overwrite removes these and nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "loss.png", "mr.png", "last.pt", "best.safetensors",
             "final.safetensors", "result.json", "backbone.pt")


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


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    """A failed write names its file: Python's own (a full disk: "[Errno 28] No space left on device")
    carries no file name, and the run directory is not the only disk a run writes to."""
    try:
        yield
    except OSError as err:
        if err.filename is not None or err.errno is None:
            raise
        raise OSError(err.errno, f"cannot write {path}: {err.strerror}") from err


class RunLog:
    def __init__(self, directory: PathLike, enabled: bool = True):
        self.dir = Path(directory)
        self.enabled = enabled
        self.metrics_path = self.dir / "metrics.jsonl"
        self._count: Optional[int] = None

    # -- the directory -------------------------------------------------------------------------
    def run_files(self) -> List[Path]:
        """The run's own files present in the directory, partly written temporaries included."""
        found = [self.dir / name for name in RUN_FILES if (self.dir / name).exists()]
        return found + self.temp_files()

    def temp_files(self) -> List[Path]:
        # io.atomic_path's temporaries (".last.pt.x1y2.tmp"), left by a kill during a write
        return sorted(p for name in RUN_FILES for p in self.dir.glob(f".{name}.*.tmp"))

    def remove(self, paths: List[Path]) -> None:
        if self.enabled:
            for path in paths:
                path.unlink(missing_ok=True)
            self._count = None

    # -- metrics -------------------------------------------------------------------------------
    def write_json(self, name: str, data) -> None:
        if self.enabled:
            with _named(self.dir / name), atomic_path(self.dir / name) as tmp:
                tmp.write_text(json.dumps(data, indent=2, default=str))

    def log(self, record: Dict) -> None:
        if not self.enabled:
            return
        count = self.count
        with _named(self.metrics_path), open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._count = count + 1

    @property
    def count(self) -> int:
        """Complete records in metrics.jsonl (what a checkpoint written now covers)."""
        if self._count is None:
            self._count = len(self.records())
        return self._count

    def records(self) -> List[Dict]:
        if not self.metrics_path.exists():
            return []
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as err:
            raise self._damaged(f"is not UTF-8 text ({err.reason} at byte {err.start})") from err
        # a kill during a write can leave a partial last line (no newline): it is not a record
        records = []
        for number, line in enumerate(lines[:-1], 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise self._damaged(f"line {number} is not a JSON record ({err.msg})") from err
                if not isinstance(records[-1], dict):
                    raise self._damaged(f"line {number} is not a JSON object")
        return records

    def _damaged(self, what: str) -> OutputPathError:
        return OutputPathError(f"{self.metrics_path} {what}: it was edited or damaged. Restore it, or move it "
                               "away to go on with a new log (the checkpoint does not need it)")

    def keep_first(self, count: int) -> None:
        """On resume: keep the ``count`` records the checkpoint covers, drop what came after it."""
        if self.enabled and self.metrics_path.exists():
            self._rewrite(self.records()[:count])

    def truncate_after(self, step: int) -> None:
        """On resume from a checkpoint that does not record its line count (older files)."""
        if self.enabled and self.metrics_path.exists():
            self._rewrite([r for r in self.records() if r.get("step", 0) <= step])

    def rewrite(self, kept: List[Dict]) -> None:
        """Replace the log with ``kept`` (a resumed run's records, brought into another folder)."""
        if self.enabled:
            self._rewrite(kept)

    def _rewrite(self, kept: List[Dict]) -> None:
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        self._count = len(kept)

    # -- plots ---------------------------------------------------------------------------------
    def plot(self) -> None:
        """loss.png (training loss per logged step) and mr.png (validation mR, test marked apart)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        records = self.records()
        name = self.dir.resolve().name
        for file, figure in (("loss.png", loss_figure(records, name)), ("mr.png", mr_figure(records, name))):
            if figure is not None:
                self._save(figure, file)

    def _save(self, fig, name: str) -> None:
        import matplotlib.pyplot as plt

        with atomic_path(self.dir / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        plt.close(fig)


def series(records: List[Dict], kind: str, split: Optional[str] = None) -> List[Dict]:
    """Records of one kind (and split), one per step (the last written wins), in step order.

    Logs of runs resumed by older versions can hold a step twice; plotting both zig-zags.
    """
    by_step: Dict[int, Dict] = {}
    for r in records:
        if r.get("kind") == kind and (split is None or r.get("split") == split):
            by_step[int(r["step"])] = r
    return [by_step[s] for s in sorted(by_step)]


def _axes(title: str, ylabel: str) -> Tuple:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_figure(records: List[Dict], run_name: str):
    train = series(records, "train")
    if not train:
        return None
    fig, ax = _axes(f"{run_name}: training loss", "loss")
    for key in ("loss", "contrastive", "triplet"):
        ax.plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax.legend()
    fig.tight_layout()
    return fig


def mr_figure(records: List[Dict], run_name: str):
    val, test = series(records, "eval", "val"), series(records, "eval", "test")
    if not (val or test):
        return None
    fig, ax = _axes(f"{run_name}: retrieval mR", "mR (%)")
    if val:
        ax.plot([r["step"] for r in val], [r["r_mean"] for r in val], marker="o", label="validation")
    for r in test:
        # the test split is scored once, with the adapters chosen on validation: a point, not the line's end
        at = r.get("best_step", r["step"])
        at = r["step"] if at is None or at < 0 else at
        ax.plot([at], [r["r_mean"]], linestyle="none", marker="*", markersize=13, color="tab:red",
                label=f"test (adapters of step {at})")
    ax.legend()
    fig.tight_layout()
    return fig
