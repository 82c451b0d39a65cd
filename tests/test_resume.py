"""Resume is idempotent: after any sequence of kills and resumes, the run directory holds what one
uninterrupted run writes (metrics.jsonl record for record, one test evaluation), a finished run
resumed does nothing, and --overwrite starts clean.

A kill is simulated by raising from a hook at a chosen point (after a metrics record is written,
or after a checkpoint is saved); nothing the trainer does afterwards runs, as under SIGKILL.
"""
import json
import shutil

import pytest

from harma_fast.cli import main
from harma_fast.data.synthetic import generate
from harma_fast.runlog import RunLog
from harma_fast.train import TrainConfig, Trainer, train


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no handler in the trainer catches it."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 images x 5 captions: 2 steps per epoch at batch 16
    return generate(tmp_path_factory.mktemp("data"), n_train=8, n_val=8, n_test=8, image_size=48, seed=1)


def config(data, out, **kw):
    # save_every=2 checkpoints each epoch's last step before that epoch's validation: the case
    # where a kill between the validation record and the epoch-end save used to duplicate it
    base = dict(train_file=str(data["train"]), val_file=str(data["val"]), test_file=str(data["test"]),
                image_root=str(data["image_root"]), model="HarMA-Tiny", output_dir=str(out), epochs=2,
                batch_size=16, lr=2e-3, num_workers=0, log_every=1, save_every=2, progress=False, seed=5,
                backend="reference")
    base.update(kw)
    return TrainConfig(**base)


def records(run):
    """metrics.jsonl without the timing field (throughput differs between any two runs)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "pairs_per_s"} for line in lines]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("straight") / "run"
    train(config(data, out))
    return out


def kill_after_record(monkeypatch, kind, step, split=None):
    original = RunLog.log

    def log(self, record):
        original(self, record)
        if record["kind"] == kind and record["step"] == step and record.get("split") == split:
            raise Killed(f"after the {kind} {split or ''} record of step {step}")
    monkeypatch.setattr(RunLog, "log", log)


KILLS = {
    # kill points, in order; each is followed by a resume of the run directory
    "after a validation record whose step was already saved": [("eval", 2, "val")],
    "before the first checkpoint": [("train", 1, None)],
    "after the test record, before the last save": [("eval", 4, "test")],
    "three kills in one run": [("train", 3, None), ("eval", 4, "val"), ("eval", 4, "test")],
}


@pytest.mark.parametrize("kills", list(KILLS.values()), ids=list(KILLS))
def test_metrics_after_kills_and_resumes_equal_the_uninterrupted_run(data, straight, tmp_path, monkeypatch, kills):
    out = tmp_path / "run"
    resume = None
    for kind, step, split in kills:
        with monkeypatch.context() as m:
            kill_after_record(m, kind, step, split)
            with pytest.raises(Killed):
                train(config(data, out, resume=resume))
        # the checkpoint, or the run directory where the kill came before the first one
        resume = str(out / "last.pt") if (out / "last.pt").exists() else str(out)
        # a kill during a checkpoint write leaves io.atomic_path's temporary behind
        (out / ".last.pt.k1ll3d.tmp").write_bytes(b"partial checkpoint")
    result = train(config(data, out, resume=resume))
    assert records(out) == records(straight)
    assert [r["split"] for r in records(out) if r["kind"] == "eval"] == ["val", "val", "test"]
    assert not list(out.glob(".*.tmp")), "temporary files of the killed write were left behind"
    assert result["test"] == json.loads((straight / "result.json").read_text())["test"]


def test_a_rerun_after_a_kill_before_the_first_checkpoint_starts_clean(data, straight, tmp_path, monkeypatch):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        kill_after_record(m, "train", 1)
        with pytest.raises(Killed):
            train(config(data, out))
    assert not (out / "last.pt").exists()
    train(config(data, out))  # the same command again, not --resume
    assert records(out) == records(straight)


def test_a_finished_run_resumed_does_nothing(data, straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "result.json").unlink()  # as if killed after the last checkpoint, before result.json
    result = train(config(data, out, resume=str(out / "last.pt")))
    assert "already finished at step 4; nothing to do" in capsys.readouterr().err
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after.keys() == before.keys()
    for name in ("last.pt", "best.safetensors", "metrics.jsonl", "config.json"):
        assert after[name] == before[name], f"{name} was rewritten"
    rewritten, original = json.loads(after["result.json"]), json.loads(before["result.json"])
    assert rewritten.pop("output_dir") == str(out)
    assert rewritten == {k: v for k, v in original.items() if k != "output_dir"} and result == rewritten | {
        "output_dir": str(out)}
    assert sum(r.get("split") == "test" for r in records(out)) == 1  # the test split is scored once


def test_a_finished_max_steps_run_stays_at_its_step(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, max_steps=3, save_every=None))
    saved = {name: (out / name).read_bytes() for name in ("last.pt", "best.safetensors", "metrics.jsonl")}
    for _ in range(2):  # used to train one step more each time: 3 -> 4 -> 5
        assert train(config(data, out, max_steps=3, save_every=None, resume=str(out / "last.pt")))["step"] == 3
        assert {name: (out / name).read_bytes() for name in saved} == saved


def test_cli_resume_takes_the_runs_own_settings_and_records_the_flags_given(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, max_steps=3, save_every=None))
    saved = {name: (out / name).read_bytes() for name in ("last.pt", "best.safetensors", "metrics.jsonl")}
    assert main(["train", "--resume", str(out / "last.pt")]) == 0  # no other flag needed; nothing to do
    assert {name: (out / name).read_bytes() for name in saved} == saved
    # flags given override the run's own settings and are recorded: train on to step 4
    assert main(["train", "--resume", str(out), "--max-steps", "4"]) == 0
    recorded = json.loads((out / "config.json").read_text())
    assert recorded["max_steps"] == 4 and recorded["backend"] == "reference" and recorded["save_every"] is None
    steps = [r["step"] for r in records(out) if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]
    tests = [r for r in records(out) if r.get("split") == "test"]
    assert [r["step"] for r in tests] == [3, 4]  # one test evaluation per finished run


def test_a_learning_rate_given_on_resume_is_the_one_used(data, tmp_path, capsys):
    # the optimizer's saved state brought its own lr back: config.json said 0.01, training ran at 0.002
    out = tmp_path / "run"
    train(config(data, out, max_steps=2, save_every=None, val_file=None, test_file=None))
    assert main(["train", "--resume", str(out), "--max-steps", "4", "--lr", "0.01"]) == 0
    assert "peak lr 0.002 -> 0.01 from step 2 on" in capsys.readouterr().err
    # 2 steps/epoch x 2 epochs, 1 warm-up step: the schedule goes on from step 2, scaled to the new peak
    lrs = [r["lr"] for r in records(out) if r["kind"] == "train"]
    assert lrs == pytest.approx([2e-3, 2e-3, 1e-2 * 2 / 3, 1e-2 / 3], rel=1e-12)
    groups = torch_load(out / "last.pt")["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == [1e-2, 1e-2]


def test_resume_on_other_training_data_is_refused_and_on_a_moved_copy_goes_on(data, tmp_path, capsys):
    # the saved position (epoch, batches consumed) indexes the order of the run's own captions: on an
    # edited --train-file the run went on silently with other batches and another schedule
    out = tmp_path / "run"
    train(config(data, out, max_steps=1, save_every=None, val_file=None, test_file=None))
    saved = (out / "last.pt").read_bytes()
    other = generate(tmp_path / "other", n_train=12, n_val=1, n_test=1, image_size=48, seed=2)
    assert main(["train", "--resume", str(out), "--max-steps", "2", "--train-file", str(other["train"]),
                 "--image-root", str(other["image_root"])]) == 2
    err = capsys.readouterr().err
    assert "the training data differ from the run's (40 captions of 8 images then, 60 of 12 now)" in err
    assert "Traceback" not in err and (out / "last.pt").read_bytes() == saved
    moved = tmp_path / "moved"  # the same data in another place is the same data
    shutil.copytree(data["train"].parent, moved)
    assert main(["train", "--resume", str(out), "--max-steps", "2", "--train-file", str(moved / data["train"].name),
                 "--image-root", str(moved / data["image_root"].name)]) == 0


def test_overwrite_starts_a_clean_directory_and_removes_only_the_runs_files(data, straight, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    (out / "notes.txt").write_text("mine")
    (out / ".best.safetensors.x9.tmp").write_bytes(b"partial")
    train(config(data, out, overwrite=True, val_file=None, test_file=None, max_steps=1, save_every=None))
    assert [r["step"] for r in records(out)] == [1]  # not the old run's records followed by the new one's
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "best.safetensors").exists() and not list(out.glob(".*.tmp"))


def test_resume_and_overwrite_together_are_refused(data, straight):
    from harma_fast.errors import ConfigError

    with pytest.raises(ConfigError, match="give one of them"):
        Trainer(config(data, straight, resume=str(straight), overwrite=True))


def test_a_kill_during_validation_keeps_the_epochs_training(data, straight, tmp_path, monkeypatch):
    # without save_every the epoch-end checkpoint was written only after validation: a kill (or a
    # failure) during a validation that takes minutes threw the epoch's training away
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        def killed(self, records):
            raise Killed("during the validation after step 2")
        m.setattr(Trainer, "evaluate", killed)
        with pytest.raises(Killed):
            train(config(data, out, save_every=None))
    assert torch_load(out / "last.pt")["position"]["step"] == 2
    train(config(data, out, save_every=None, resume=str(out / "last.pt")))
    assert records(out) == records(straight)


def test_a_kill_during_the_validation_at_a_step_budget_keeps_the_training_before_it(data, tmp_path, monkeypatch):
    # a run stopped by --max-steps or max_minutes in the middle of an epoch validated before its next
    # checkpoint: a kill there (a cluster job's time limit, right after the budget) lost every step
    # since the last epoch end
    out = tmp_path / "run"
    original = Trainer.evaluate

    def killed_at_step_3(self, records):
        if self.position.step == 3:
            raise Killed("during the validation after step 3")
        return original(self, records)
    with monkeypatch.context() as m:
        m.setattr(Trainer, "evaluate", killed_at_step_3)
        with pytest.raises(Killed):
            train(config(data, out, max_steps=3, save_every=None))
    assert torch_load(out / "last.pt")["position"]["step"] == 3
    assert train(config(data, out, max_steps=3, save_every=None, resume=str(out)))["step"] == 3
    assert [(r["kind"], r.get("split"), r["step"]) for r in records(out)] == [
        ("train", None, 1), ("train", None, 2), ("eval", "val", 2), ("train", None, 3), ("eval", "val", 3),
        ("eval", "test", 3)]


def torch_load(path):
    import torch
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_with_the_preset_again_keeps_the_runs_own_settings(data, tmp_path, capsys):
    out, preset = tmp_path / "run", tmp_path / "p.yaml"
    preset.write_text(f"batch_size: 8\noutput_dir: {tmp_path / 'preset_default'}\nmodel: HarMA-Tiny\n"
                      f"train_file: {data['train']}\nimage_root: {data['image_root']}\nnum_workers: 0\n"
                      "backend: reference\nlog_every: 1\n")
    assert main(["train", "--preset", str(preset), "--output-dir", str(out), "--batch-size", "16",
                 "--max-steps", "1", "--no-progress"]) == 0
    capsys.readouterr()
    # the same command again with --resume: the preset's batch_size 8 and output_dir must not apply
    assert main(["train", "--preset", str(preset), "--resume", str(out), "--max-steps", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "the preset's batch_size, output_dir differ from them and are not used" in err
    assert json.loads((out / "config.json").read_text())["batch_size"] == 16
    assert [r["step"] for r in records(out) if r["kind"] == "train"] == [1, 2]
    assert not (tmp_path / "preset_default").exists()
    # a flag that would change which captions each step sees is refused, not silently applied
    assert main(["train", "--resume", str(out), "--batch-size", "8", "--max-steps", "3"]) == 2
    assert "batch_size 16 -> 8" in capsys.readouterr().err


def test_a_preset_cannot_resume_or_overwrite(data, tmp_path, capsys):
    preset = tmp_path / "p.yaml"
    preset.write_text(f"resume: {tmp_path / 'run'}\nmodel: HarMA-Tiny\n")
    assert main(["train", "--preset", str(preset)]) == 2
    assert "'resume' is not a preset setting; pass --resume" in capsys.readouterr().err


def rewrite(state, path):
    import torch
    from harma_fast.checkpoints import tensor_checksum
    state = {k: v for k, v in state.items() if k != "checksum"}
    torch.save(dict(state, checksum=tensor_checksum(state)), path)


def test_resume_under_another_number_of_processes_is_refused(data, tmp_path, capsys):
    # batch_size is per process: a run of 2 processes resumed by 1 trained on with half the global
    # batch, twice the steps per epoch, and its saved position read in batches of the other size
    import torch
    out = tmp_path / "run"
    train(config(data, out, max_steps=1, save_every=None))
    state = torch_load(out / "last.pt")
    assert state["position"]["world"] == 1
    state["position"]["world"] = 2  # as a torchrun --nproc-per-node 2 run saves it
    rewrite(state, out / "last.pt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert "trained by 2 process(es) (global batch 32) and this resume runs 1" in err
    assert "torchrun --nproc-per-node 2" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    del state["position"]["world"]  # a checkpoint from before the world was recorded resumes as before
    rewrite(state, out / "last.pt")
    assert train(config(data, out, max_steps=2, save_every=None, resume=str(out / "last.pt")))["step"] == 2
    assert torch_load(out / "last.pt")["position"]["world"] == 1


@pytest.mark.parametrize("step", [1, 3])
def test_ctrl_c_says_which_checkpoint_was_kept_and_how_to_go_on(data, straight, tmp_path, monkeypatch, step):
    # Ctrl-C printed "harma-fast train: interrupted" alone: nothing said whether any work was kept
    from harma_fast.train import RunInterrupted

    out, original = tmp_path / "run", RunLog.log

    def log(self, record):
        original(self, record)
        if record["kind"] == "train" and record["step"] == step:
            raise KeyboardInterrupt
    monkeypatch.setattr(RunLog, "log", log)
    with pytest.raises(RunInterrupted) as info:
        train(config(data, out))
    if step == 1:  # before the first checkpoint (save_every=2)
        assert str(info.value) == "No checkpoint was written before it (nothing to resume from)"
    else:
        assert str(info.value) == (f"Last good checkpoint: {out / 'last.pt'} (step 2): the same command with "
                                   f"--resume {out} goes on from it")
        monkeypatch.undo()
        train(config(data, out, resume=str(out)))
        assert records(out) == records(straight)
