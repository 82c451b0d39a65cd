"""Plots a person would read: validation and test apart, one point per step, whole steps, the run's name."""
import json

import pytest

from harma_fast.runlog import RunLog


def _eval(split, step, r_mean, **kw):
    return {"kind": "eval", "split": split, "step": step, "r_mean": r_mean, **kw}


def _train(step, loss):
    return {"kind": "train", "step": step, "loss": loss, "contrastive": loss / 2, "triplet": loss / 2}


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """RunLog.plot() of a log written by an older resume (steps 2-3 twice), figures kept, not saved."""
    import matplotlib.pyplot as plt

    run = tmp_path / "rsitmd-vitb32"
    run.mkdir()
    records = ([_train(s, 5.0 - s) for s in (1, 2, 3)] + [_eval("val", 2, 10.0)]
               + [_train(s, 4.5 - s) for s in (2, 3)] + [_eval("val", 2, 11.0)]
               + [_train(4, 1.0), _eval("val", 4, 20.0), _eval("test", 4, 15.0, best_step=4)])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = {}
    monkeypatch.setattr(RunLog, "_save", lambda self, fig, name: kept.__setitem__(name, fig))
    RunLog(run).plot()
    yield kept
    for fig in kept.values():
        plt.close(fig)


def _lines(fig):
    return {line.get_label(): line for line in fig.axes[0].get_lines()}


def test_mr_plot_marks_test_apart_from_the_validation_line(figures):
    lines = _lines(figures["mr.png"])
    val = lines["validation"]
    assert list(val.get_xdata()) == [2, 4] and list(val.get_ydata()) == [11.0, 20.0]  # last write of step 2 wins
    tests = [line for label, line in lines.items() if label.startswith("test")]
    assert len(tests) == 1 and list(tests[0].get_ydata()) == [15.0]
    assert tests[0].get_linestyle() == "None"  # a marked point, not joined to the validation line


def test_plots_have_the_run_name_and_whole_steps(figures):
    for name in ("loss.png", "mr.png"):
        fig = figures[name]
        ax = fig.axes[0]
        assert "rsitmd-vitb32" in ax.get_title(), name
        fig.canvas.draw()
        low, high = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks), f"{name}: x ticks {ticks}"
    loss = _lines(figures["loss.png"])["loss"]
    assert list(loss.get_xdata()) == [1, 2, 3, 4]  # a resumed run's repeated steps drawn once, in order
    assert list(loss.get_ydata()) == [4.0, 2.5, 1.5, 1.0]


def test_a_partly_written_last_line_is_not_a_record(tmp_path):
    log = RunLog(tmp_path)
    log.log({"kind": "train", "step": 1})
    with open(log.metrics_path, "a") as f:
        f.write('{"kind": "tra')  # killed mid-write
    assert RunLog(tmp_path).records() == [{"kind": "train", "step": 1}]
    assert RunLog(tmp_path).count == 1


def test_a_write_that_fails_names_the_file(tmp_path):
    # a full disk read "[Errno 28] No space left on device", naming no file (and a run writes to more than one disk)
    import resource
    import signal
    log = RunLog(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails, as on a full disk
    resource.setrlimit(resource.RLIMIT_FSIZE, (100, hard))
    try:
        with pytest.raises(OSError, match=f"cannot write {tmp_path / 'metrics.jsonl'}: File too large"):
            log.log({"kind": "train", "step": 1, "note": "x" * 200})
        with pytest.raises(OSError, match=f"cannot write {tmp_path / 'config.json'}: File too large"):
            log.write_json("config.json", {"note": "x" * 200})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    assert log.records() == [] and not (tmp_path / "config.json").exists()
