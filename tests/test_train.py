import io
import json
import socket
import time
import sys

import pytest
import torch
import torch.multiprocessing as mp

import harma_fast
import harma_fast.checkpoints
from harma_fast.cli import build_parser, train_config
from harma_fast.data.synthetic import generate
from harma_fast.train import TrainConfig, Trainer, TrainingDiverged, train
from dist_workers import train_worker


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_train=40, n_val=8, n_test=8, image_size=48, seed=1)


def config(data, out, **kw):
    base = dict(train_file=str(data["train"]), image_root=str(data["image_root"]), model="HarMA-Tiny",
                output_dir=str(out), epochs=2, batch_size=16, lr=2e-3, num_workers=0, log_every=1,
                progress=False, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, exact=True, name=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), name
        for k in a:
            assert_same_tensors(a[k], b[k], exact, f"{name}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, exact, f"{name}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert (torch.equal(a, b) if exact else torch.allclose(a, b, rtol=2e-4, atol=1e-6)), name
    else:
        assert a == b, name


def test_exact_resume_is_bit_identical(data, tmp_path):
    train(config(data, tmp_path / "straight", max_steps=4))
    train(config(data, tmp_path / "resumed", max_steps=2))
    assert state(tmp_path / "resumed" / "last.pt")["position"]["step"] == 2
    train(config(data, tmp_path / "resumed", max_steps=4, resume=str(tmp_path / "resumed" / "last.pt")))
    a, b = state(tmp_path / "straight" / "last.pt"), state(tmp_path / "resumed" / "last.pt")
    assert a["position"]["step"] == b["position"]["step"] == 4
    assert_same_tensors(a["adapters"], b["adapters"], name="adapters")
    assert_same_tensors(a["optimizer"], b["optimizer"], name="optimizer")
    assert_same_tensors(a["loss"], b["loss"], name="temperature")
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


def test_run_directory_contents(data, tmp_path):
    out = tmp_path / "run"
    result = train(config(data, out, val_file=str(data["val"]), test_file=str(data["test"]), epochs=1))
    for name in ("config.json", "metrics.jsonl", "loss.png", "mr.png", "last.pt", "best.safetensors", "result.json",
                 "backbone.pt"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    assert {"loss", "lr", "pairs_per_s", "temperature"} <= set(records[0])
    assert set(result["test"]) >= {"txt_r1", "img_r10", "r_mean"}
    assert json.loads((out / "config.json").read_text())["batch_size"] == 16
    # the saved backbone rebuilds the random-initialised model the adapters belong to
    model = harma_fast.create_model("HarMA-Tiny", pretrained=out / "backbone.pt")
    harma_fast.load_adapters(model, out / "best.safetensors")
    assert result["adapters"] == str(out / "best.safetensors")
    harma_fast.load_adapters(model, out / "final.safetensors")  # the last adapters are kept too


def test_a_run_without_validation_leaves_adapters_to_export(data, tmp_path, capsys):
    from harma_fast.checkpoints import adapter_state_dict

    out = tmp_path / "run"
    result = train(config(data, out, epochs=1, max_steps=2, backend="reference"))
    assert result["adapters"] == str(out / "final.safetensors") and not (out / "best.safetensors").exists()
    assert f"adapters: {out / 'final.safetensors'} (the last step's" in capsys.readouterr().err
    model = harma_fast.create_model("HarMA-Tiny", pretrained=out / "backbone.pt")
    harma_fast.load_adapters(model, out / "final.safetensors")
    trained = Trainer(config(data, out, epochs=1, max_steps=2, backend="reference", resume=str(out)))
    for key, value in adapter_state_dict(trained.model).items():  # the adapters last.pt holds
        assert torch.equal(adapter_state_dict(model)[key], value), key


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(data, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = harma_fast.losses.HarMALoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:
            return type(out)(out.total * float("nan"), out.contrastive, out.triplet)
        return out
    monkeypatch.setattr(harma_fast.losses.HarMALoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 3 .*Last good checkpoint: .*last.pt \(step 2\)"):
        train(config(data, out, save_every=2))
    assert state(out / "last.pt")["position"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in state(out / "last.pt")["adapters"].values())


def test_nan_in_an_earlier_micro_batch_of_an_accumulated_step_is_caught(data, tmp_path, monkeypatch):
    # only the step's last micro-batch was looked at: a NaN in the first one reached the summed
    # gradients, the step wrote NaN adapters, and the next checkpoint overwrote the last good one
    calls = {"n": 0}
    original = harma_fast.losses.HarMALoss.forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3:  # the first of step 2's two micro-batches
            return type(out)(out.total * float("nan"), out.contrastive, out.triplet)
        return out
    monkeypatch.setattr(harma_fast.losses.HarMALoss, "forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 2 .*Last good checkpoint: .*\(step 1\)"):
        train(config(data, out, batch_size=8, grad_accum=2, save_every=1, backend="reference"))
    assert state(out / "last.pt")["position"]["step"] == 1
    assert all(torch.isfinite(v).all() for v in state(out / "last.pt")["adapters"].values())


def test_the_logged_loss_of_an_accumulated_step_is_the_mean_of_its_micro_batches(data, tmp_path, monkeypatch):
    # the log showed the step's last micro-batch's loss alone
    seen = []
    original = harma_fast.losses.HarMALoss.forward

    def recording(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        seen.append([t.item() for t in out])
        return out
    monkeypatch.setattr(harma_fast.losses.HarMALoss, "forward", recording)
    out = tmp_path / "run"
    train(config(data, out, batch_size=8, grad_accum=3, max_steps=2, backend="reference"))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(seen) == 6 and [r["step"] for r in logged] == [1, 2]
    for record, micro in zip(logged, (seen[:3], seen[3:])):
        for i, key in enumerate(("loss", "contrastive", "triplet")):
            assert record[key] == pytest.approx(sum(m[i] for m in micro) / 3, rel=1e-6), (record["step"], key)


def test_an_image_that_goes_bad_mid_epoch_is_named_with_how_to_go_on(data, tmp_path, capsys):
    import shutil
    from harma_fast.cli import main
    root = tmp_path / "data"
    shutil.copytree(data["train"].parent, root)
    train_file, images = root / data["train"].name, root / data["image_root"].name
    from harma_fast.data.datasets import EpochBatches
    records = json.loads(train_file.read_text())
    third = list(EpochBatches(len(records), 8, seed=5))[2]  # the captions of step 3 at batch 8, seed 5
    image = images / records[third[0]]["image"]
    good = image.read_bytes()
    image.write_bytes(b"not an image")
    out = tmp_path / "run"
    args = ["train", "--model", "HarMA-Tiny", "--train-file", str(train_file), "--image-root", str(images),
            "--output-dir", str(out), "--batch-size", "8", "--max-steps", "4", "--save-every", "1",
            "--num-workers", "0", "--backend", "reference", "--no-progress", "--no-check-images", "--seed", "5"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"image {image} cannot be read" in err and "Traceback" not in err
    assert f"Last good checkpoint: {out / 'last.pt'} (step 2). Replace the image" in err
    assert err.endswith(f"then run the command again with --resume {out}")
    image.write_bytes(good)
    assert main(["train", "--resume", str(out)]) == 0
    assert state(out / "last.pt")["position"]["step"] == 4


def test_a_grad_accum_an_epoch_cannot_fill_says_what_to_lower(data, tmp_path, capsys):
    from harma_fast.cli import main
    out = tmp_path / "run"
    assert main(["train", "--model", "HarMA-Tiny", "--train-file", str(data["train"]), "--image-root",
                 str(data["image_root"]), "--output-dir", str(out), "--batch-size", "64", "--grad-accum", "4",
                 "--num-workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "an epoch of 200 captions holds 3 batch(es) of 64: lower --grad-accum to at most 3, or --batch-size" in err
    assert not out.exists()


def test_unwritable_run_directory(data, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="run directory .*a_file/run is not writable"):
        train(config(data, blocker / "run"))


def test_existing_run_is_not_overwritten_silently(data, tmp_path):
    train(config(data, tmp_path / "run", max_steps=1))
    with pytest.raises(FileExistsError, match="already holds a run.*--resume"):
        train(config(data, tmp_path / "run", max_steps=1))


def test_resume_from_a_checkpoint_of_another_model(data, tmp_path):
    import open_clip
    cfg = json.loads((harma_fast.models._CONFIG_DIR / "HarMA-Tiny.json").read_text())
    cfg["text_cfg"]["width"] = 96
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "HarMA-Tiny-Wide.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "cfg")
    train(config(data, tmp_path / "tiny", max_steps=1))
    with pytest.raises(ValueError, match="trained on HarMA-Tiny .*this run builds HarMA-Tiny-Wide.*another model"):
        train(config(data, tmp_path / "wide", model="HarMA-Tiny-Wide", resume=str(tmp_path / "tiny" / "last.pt")))
    with pytest.raises(ValueError, match="adapters of another layout \\(share: 'both' vs 'text'\\)"):
        train(config(data, tmp_path / "layout", harma="released", resume=str(tmp_path / "tiny" / "last.pt")))


def test_cli_preset_and_flags():
    args = build_parser().parse_args(["train", "--preset", "rsitmd-georsclip", "--epochs", "3", "--image-root", "imgs"])
    cfg = train_config(args)
    # GeoRSCLIP was tuned from OpenAI's CLIP, whose MLPs run QuickGELU
    assert (cfg.lr, cfg.epochs, cfg.image_root, cfg.model) == (4e-6, 3, "imgs", "ViT-B-32-quickgelu")
    assert cfg.pretrained == "RS5M_ViT-B-32_RET-2.pt" and cfg.batch_size == 214
    with pytest.raises(ValueError, match="unknown preset 'rsitmd'"):
        train_config(build_parser().parse_args(["train", "--preset", "rsitmd"]))
    with pytest.raises(ValueError, match="set --train-file, --image-root"):
        train_config(build_parser().parse_args(["train"]))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_training_equals_one_process_on_the_same_global_batches(data, tmp_path):
    single = config(data, tmp_path / "single", batch_size=16, max_steps=3, epochs=1)
    train(single)
    ddp = config(data, tmp_path / "ddp", batch_size=8, max_steps=3, epochs=1)
    mp.spawn(train_worker, args=(2, _free_port(), ddp), nprocs=2, join=True)
    a, b = state(tmp_path / "single" / "last.pt"), state(tmp_path / "ddp" / "last.pt")
    assert b["position"]["step"] == 3
    torch.manual_seed(single.seed)  # the trainer's initial adapters, rebuilt
    init = harma_fast.checkpoints.adapter_state_dict(harma_fast.patch(harma_fast.create_model("HarMA-Tiny")))
    moved = max((a["adapters"][k] - init[k]).abs().max().item() for k in init)
    diff = max((a["adapters"][k] - b["adapters"][k]).abs().max().item() for k in init)
    # The ranks sum their gradients in another order than one process does (1e-7 apart after one
    # step); Adam's normalisation magnifies that for near-zero gradients, by an amount that depends
    # on the CPU's fp32 kernels (measured: 1/290 of the movement on one machine, 1/200 on another).
    # Equal means: the runs agree to far below what training moved the weights; a real difference
    # (each rank with its local negatives only: 1.9x the movement, measured) moves them far apart.
    assert moved > 1e-3
    assert diff < 0.02 * moved, f"two-process adapters differ by {diff:.2e} (training moved them by {moved:.2e})"
    assert_same_tensors(a["loss"], b["loss"], exact=False, name="temperature")


def test_a_time_budget_stops_every_process_at_the_same_step(data, tmp_path):
    # each process timed itself: the one whose clock ran out first stopped and the other waited
    # in a collective for it (a hang until gloo's 30-minute timeout); rank 0's clock decides now
    from dist_workers import skewed_clock_train_worker
    ddp = config(data, tmp_path / "ddp", batch_size=8, max_steps=3, epochs=1, max_minutes=600)
    context = mp.start_processes(skewed_clock_train_worker, args=(2, _free_port(), ddp), nprocs=2, join=False)
    deadline = time.monotonic() + 240
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the two processes hung: they did not agree on when the time budget was spent")
    assert state(tmp_path / "ddp" / "last.pt")["position"]["step"] == 3


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_logs_are_plain_lines_when_stderr_is_not_a_terminal(data, tmp_path, capsys):
    train(config(data, tmp_path / "run", val_file=str(data["val"]), epochs=1, max_steps=4, log_every=2,
                 progress=True, backend="reference"))
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b[" not in err  # no redrawn bar, no cursor codes
    lines = err.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("step ")] == [
        "step 1/12 epoch 1/1", "step 2/12 epoch 1/1", "step 4/12 epoch 1/1"]  # the first, then every log_every
    table = lines.index("validation after step 4")
    assert lines[table + 1].startswith("| R@1") and lines[table + 3].startswith("| ")


@pytest.mark.parametrize("progress, tqdm_disable, bar", [(True, None, True), (True, "1", False), (False, None, False)])
def test_progress_bar_only_on_a_terminal_unless_turned_off(data, tmp_path, monkeypatch, progress, tqdm_disable, bar):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    if tqdm_disable is None:
        monkeypatch.delenv("TQDM_DISABLE", raising=False)
    else:
        monkeypatch.setenv("TQDM_DISABLE", tqdm_disable)
    train(config(data, tmp_path / "run", epochs=1, max_steps=1, progress=progress, backend="reference"))
    assert ("\r" in terminal.getvalue()) == bar
    assert ("step 1/12 epoch 1/1: loss" in terminal.getvalue()) != bar


def test_no_progress_flag_of_train_and_demo():
    args = build_parser().parse_args(["train", "--train-file", "t.json", "--image-root", "i", "--no-progress"])
    assert train_config(args).progress is False
    assert train_config(build_parser().parse_args(["train", "--train-file", "t.json", "--image-root", "i"])).progress
    assert build_parser().parse_args(["demo", "--no-progress"]).progress is False


def test_adamw_runs_fused_only_where_every_parameter_is_a_cuda_float():
    from types import SimpleNamespace

    from harma_fast.train import fused_optimizer_ok

    cuda = SimpleNamespace(is_cuda=True, is_floating_point=lambda: True)
    assert fused_optimizer_ok([cuda, cuda])
    assert not fused_optimizer_ok([cuda, torch.zeros(2)])  # one CPU tensor: PyTorch would refuse fused
    assert not fused_optimizer_ok([SimpleNamespace(is_cuda=True, is_floating_point=lambda: False)])
    assert not fused_optimizer_ok([])


def test_the_process_group_waits_for_rank_0s_image_check_and_validation(monkeypatch):
    # NCCL's default 10-minute timeout ended jobs whose rank 0 checked a large dataset's images
    import datetime

    import harma_fast.train as trainer
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer.dist, "is_initialized", lambda: bool(seen))
    monkeypatch.setattr(trainer.dist, "init_process_group", lambda backend, **kw: seen.update(kw, backend=backend))
    monkeypatch.setattr(trainer.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(trainer.dist, "get_world_size", lambda: 2)
    assert trainer._distributed()[:2] == (1, 2)
    assert seen["timeout"] >= datetime.timedelta(hours=1)
