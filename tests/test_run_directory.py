"""What a training command may do to its --output-dir, and what it reports when the directory or
the run's own files are not what it expects: earlier results are never deleted without
--overwrite, a refused command leaves no folder behind, a damaged log or config is a clear error,
the test split is labelled with the adapters it was scored with, and the log shows each step's lr."""
import json
import shutil

import pytest

from harma_fast.cli import main
from harma_fast.data.synthetic import generate
from harma_fast.errors import ConfigError, OutputPathError
from harma_fast.runlog import RunLog
from harma_fast.train import RunExistsError, TrainConfig, linear_warmup_schedule, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # 8 images x 5 captions: 2 steps per epoch at batch 16
    return generate(tmp_path_factory.mktemp("data"), n_train=8, n_val=8, n_test=8, image_size=48, seed=1)


def config(data, out, **kw):
    base = dict(train_file=str(data["train"]), val_file=str(data["val"]), test_file=str(data["test"]),
                image_root=str(data["image_root"]), model="HarMA-Tiny", output_dir=str(out), epochs=2,
                batch_size=16, lr=2e-3, num_workers=0, log_every=1, progress=False, seed=5, backend="reference")
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(data, out))
    return out


def records(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kept", ["best.safetensors", "final.safetensors", "result.json"])
def test_a_finished_runs_adapters_are_not_deleted_without_overwrite(data, finished, tmp_path, kept):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "last.pt").unlink()  # removed to save space: the adapters are what the user keeps
    for name in {"best.safetensors", "final.safetensors", "result.json"} - {kept}:
        (out / name).unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunExistsError, match=f"holds {kept}.*pass --overwrite"):
        train(config(data, out, max_steps=1))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_of_a_folder_without_last_pt_does_not_delete_a_finished_runs_files(data, finished, tmp_path):
    # `--resume RUN_DIR` with no last.pt starts over (a run killed before its first checkpoint);
    # it removed a finished run's adapters, result and backbone.pt once its last.pt was deleted
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "last.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["train", "--resume", str(out), "--no-progress"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(RunExistsError, match="--resume .*no last.pt.*best.safetensors.*pass --overwrite instead"):
        train(config(data, out, max_steps=1, resume=str(out)))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_run_cut_short_by_max_steps_says_so(data, tmp_path, capsys):
    # the log went from "step 1/4" straight to the test, with no word of why the run ended at step 1
    train(config(data, tmp_path / "run", max_steps=1, val_file=None, test_file=None))
    err = capsys.readouterr().err
    assert "stopping at step 1 of 4: max_steps 1 reached (the learning-rate schedule spans all 4)" in err


def test_a_config_json_that_is_not_a_runs_is_not_deleted(data, tmp_path):
    out = tmp_path / "hf_model"
    out.mkdir()
    (out / "config.json").write_text('{"architectures": ["CLIPModel"]}')
    with pytest.raises(RunExistsError, match="config.json that is not a harma-fast run's"):
        train(config(data, out, max_steps=1, val_file=None, test_file=None))
    assert json.loads((out / "config.json").read_text()) == {"architectures": ["CLIPModel"]}


def test_a_run_killed_before_its_first_checkpoint_still_starts_over(data, finished, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "metrics.jsonl"):  # what such a run leaves: its settings and first records
        shutil.copy(finished / name, out / name)
    train(config(data, out, max_steps=1, val_file=None, test_file=None))
    assert [r["step"] for r in records(out)] == [1]


def test_a_refused_command_leaves_no_folder_behind(data, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    out = tmp_path / "new" / "run"
    with pytest.raises(Exception):
        train(config(data, out, train_file=str(bad)))
    assert not (tmp_path / "new").exists()
    assert main(["train", "--model", "HarMA-Tiny", "--train-file", str(bad), "--image-root",
                 str(data["image_root"]), "--output-dir", str(out)]) == 2
    assert not (tmp_path / "new").exists()


def test_resuming_into_a_folder_that_holds_another_run_is_refused(data, finished, tmp_path):
    # --resume a --output-dir c replaced c's last.pt, adapters, backbone, settings and log file by file
    source, other = tmp_path / "a", tmp_path / "c"
    train(config(data, source, max_steps=1, val_file=None, test_file=None))
    shutil.copytree(finished, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(RunExistsError, match="already holds last.pt, final.safetensors, result.json, "
                                             "best.safetensors.* would replace"):
        train(config(data, other, max_steps=2, val_file=None, test_file=None, resume=str(source / "last.pt")))
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


class Killed(BaseException):
    """Stands for SIGKILL: no handler in the trainer catches it."""


def test_resumed_into_another_folder_the_log_is_the_whole_runs(data, finished, tmp_path, monkeypatch):
    # the new folder's log started empty: it lacked the run's first records, and a kill there before
    # its first checkpoint left records that the same command, run again, kept and then wrote twice
    source, moved = tmp_path / "a", tmp_path / "b"
    original = RunLog.log

    def killed_after_the_validation_of_step_2(self, record):  # the checkpoint of step 2 is on disk
        original(self, record)
        if (record["kind"], record["step"]) == ("eval", 2):
            raise Killed
    with monkeypatch.context() as m:
        m.setattr(RunLog, "log", killed_after_the_validation_of_step_2)
        with pytest.raises(Killed):
            train(config(data, source))
    train(config(data, moved, resume=str(source / "last.pt")))
    untimed = lambda run: [{k: v for k, v in r.items() if k != "pairs_per_s"} for r in records(run)]  # noqa: E731
    assert untimed(moved) == untimed(finished)


def test_resumed_into_another_folder_the_test_uses_the_runs_best_adapters(data, finished, tmp_path):
    source = tmp_path / "a"
    shutil.copytree(finished, source)
    best_step = json.loads((finished / "result.json").read_text())["best_step"]
    # lr 0 from here on cannot beat the best validation so far: no new best.safetensors is written
    result = train(config(data, tmp_path / "b", epochs=3, resume=str(source / "last.pt")))
    assert (tmp_path / "b" / "best.safetensors").read_bytes() == (source / "best.safetensors").read_bytes() or (
        result["best_step"] > best_step)
    assert result["test_adapters"] == "best.safetensors"
    test = [r for r in records(tmp_path / "b") if r.get("split") == "test"][-1]
    assert test["adapters"] == "best.safetensors"


def test_the_test_is_labelled_with_the_adapters_it_used(data, finished, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "best.safetensors").unlink()
    result = train(config(data, out, epochs=3, val_file=None, resume=str(out / "last.pt")))
    assert result["test_adapters"] == "final.safetensors"
    err = capsys.readouterr().err
    assert "test (the last step's adapters" in err and "chosen on validation" not in err


@pytest.mark.parametrize("content", ["[]", "null", "3"])
def test_a_config_json_that_is_not_an_object_is_a_clear_resume_error(finished, tmp_path, content, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "config.json").write_text(content)
    assert main(["train", "--resume", str(out)]) == 2  # the CLI takes a resumed run's settings from it
    err = capsys.readouterr().err
    assert "not a run's settings" in err and "Traceback" not in err


@pytest.mark.parametrize("damage", [b'{"kind": "train", "step": 1}\nGARBAGE\n', b"\xff\xfe\n"])
def test_a_damaged_metrics_log_is_a_clear_resume_error(data, finished, tmp_path, damage, capsys):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    (out / "metrics.jsonl").write_bytes(damage)
    assert main(["train", "--resume", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "edited or damaged" in err and "Traceback" not in err


def test_the_log_shows_the_lr_each_step_ran_at(data, tmp_path):
    out = tmp_path / "run"
    train(config(data, out, epochs=2, warmup=0.5, val_file=None, test_file=None))
    logged = [r["lr"] for r in records(out) if r["kind"] == "train"]
    # the schedule itself, stepped as training steps it: the lr of step k before its scheduler.step()
    import torch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-3)
    schedule = linear_warmup_schedule(opt, 4, 2)
    used = []
    for _ in range(4):
        used.append(schedule.get_last_lr()[0])
        opt.step()
        schedule.step()
    assert logged == pytest.approx(used) and logged[0] > 0 and logged[-1] > 0


def test_triton_where_it_cannot_run_is_refused_before_any_work(data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    assert main(["train", "--model", "HarMA-Tiny", "--train-file", str(data["train"]), "--image-root",
                 str(data["image_root"]), "--output-dir", str(out), "--backend", "triton", "--no-progress"]) == 2
    assert "--backend triton runs on a CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
    assert main(["eval", "--model", "HarMA-Tiny", "--test-file", str(data["test"]), "--image-root",
                 str(data["image_root"]), "--backend", "triton", "--no-progress"]) == 2
    assert "--backend triton runs on a CUDA GPU" in capsys.readouterr().err


def test_a_cuda_device_without_a_gpu_is_a_clear_error(data, tmp_path, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        train(config(data, tmp_path / "run", device="cuda"))
    assert not (tmp_path / "run").exists()


def test_eval_reads_the_checkpoints_own_adapter_layout(data, tmp_path, capsys):
    out = tmp_path / "run"
    train(config(data, out, harma="none", max_steps=1, val_file=None, test_file=None))
    assert main(["eval", "--model", "HarMA-Tiny", "--test-file", str(data["test"]), "--image-root",
                 str(data["image_root"]), "--checkpoint", str(out / "last.pt"), "--pretrained",
                 str(out / "backbone.pt"), "--no-progress"]) == 0
    assert main(["eval", "--model", "HarMA-Tiny", "--test-file", str(data["test"]), "--image-root",
                 str(data["image_root"]), "--checkpoint", str(out / "last.pt"), "--pretrained",
                 str(out / "backbone.pt"), "--harma", "paper", "--no-progress"]) == 2
    assert "another layout" in capsys.readouterr().err


def test_diverging_before_the_first_checkpoint_names_no_missing_file(data, tmp_path, monkeypatch):
    import harma_fast.losses
    from harma_fast.train import TrainingDiverged
    original = harma_fast.losses.HarMALoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        return type(out)(out.total * float("nan"), out.contrastive, out.triplet)
    monkeypatch.setattr(harma_fast.losses.HarMALoss, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="No checkpoint was written before it") as info:
        train(config(data, tmp_path / "run", val_file=None, test_file=None))
    assert "last.pt" not in str(info.value)


@pytest.mark.parametrize("temperature", ["1.0", "0.6", "0.0005"])
def test_a_starting_temperature_the_loss_would_clamp_is_refused(data, tmp_path, capsys, temperature):
    out, preset = tmp_path / "run", tmp_path / "p.yaml"
    preset.write_text(f"temperature: {temperature}\n")  # the loss would compute with a bound instead
    assert main(["train", "--preset", str(preset), "--model", "HarMA-Tiny", "--train-file", str(data["train"]),
                 "--image-root", str(data["image_root"]), "--output-dir", str(out)]) == 2
    assert "in [0.001, 0.5], the range the loss keeps it in" in capsys.readouterr().err and not out.exists()
    with pytest.raises(ConfigError, match="the range the loss keeps it in"):
        config(data, out, temperature=float(temperature))


def test_a_run_resumes_from_another_working_directory(data, tmp_path, monkeypatch):
    # config.json held the paths as typed, relative to where the run began: --resume elsewhere failed
    monkeypatch.chdir(data["image_root"].parent)
    rel = lambda p: str(p.relative_to(data["image_root"].parent))  # noqa: E731
    out = tmp_path / "run"
    assert main(["train", "--model", "HarMA-Tiny", "--train-file", rel(data["train"]), "--image-root",
                 rel(data["image_root"]), "--output-dir", str(out), "--batch-size", "16", "--max-steps", "1",
                 "--epochs", "2", "--num-workers", "0", "--backend", "reference", "--no-progress"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train_file"] == str(data["train"]) and saved["image_root"] == str(data["image_root"])
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(out), "--max-steps", "2"]) == 0
    assert json.loads((out / "result.json").read_text())["step"] == 2


@pytest.mark.parametrize("save_every, culprit", [("1", "last.pt"), (None, "final.safetensors")])
def test_a_full_disk_while_saving_is_one_line_and_keeps_what_was_written(data, finished, tmp_path, capsys,
                                                                         save_every, culprit):
    # torch.save and safetensors report a failed write as a RuntimeError / SafetensorError, which the
    # CLI took for a bug in harma-fast: a traceback and "internal error ... please report it"
    import resource
    import signal
    out = tmp_path / "run"
    train(config(data, out, pretrained=str(finished / "backbone.pt"), batch_size=8, max_steps=1, val_file=None,
                 test_file=None))  # 5 steps per epoch: step 2 ends no epoch, a save there is --save-every's
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # no file may grow past 1 MiB from here on, as on a disk that filled up (last.pt is ~5 MiB, the adapters ~1.6)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, hard))
    try:
        rc = main(["train", "--resume", str(out), "--max-steps", "2"] + (["--save-every", save_every] if save_every
                                                                         else []))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert f"error: cannot write {out / culprit}: the write failed" in err and "is the disk full" in err
    assert "Traceback" not in err and "internal error" not in err
    for name in ("last.pt", "final.safetensors"):  # the files written before are whole and unchanged
        assert (out / name).read_bytes() == before[name], name
    assert not list(out.glob(".*.tmp"))
