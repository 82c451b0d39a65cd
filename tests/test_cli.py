"""The command line's error boundary: bad flags, presets and paths are one clear line, exit 2, before any work."""
import argparse
import dataclasses
import json
import math
import re

import pytest
import sys

import torch

import harma_fast
from harma_fast import cli
from harma_fast.cli import build_parser, main, train_config
from harma_fast.data.annotations import load_eval_records
from harma_fast.data.synthetic import generate
from harma_fast.errors import ConfigError, HarmaError, OutputPathError
from harma_fast.train import TrainConfig


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("data"), n_train=24, n_val=6, n_test=6, image_size=32, seed=3)


def exits_with_usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def train_argv(data, out, *extra):
    return ["train", "--train-file", str(data["train"]), "--image-root", str(data["image_root"]), "--model",
            "HarMA-Tiny", "--output-dir", str(out), "--num-workers", "0", "--epochs", "1", *extra]


# --- numeric flags are checked when parsed -----------------------------------------------------
@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--batch-size", "-8"), ("--epochs", "-1"),
                                         ("--grad-accum", "0"), ("--eval-every", "0"), ("--save-every", "0"),
                                         ("--max-steps", "0"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "-0.5"),
                                         ("--num-workers", "-1"), ("--clip-grad-norm", "0"), ("--epochs", "2.5")])
def test_train_refuses_out_of_range_flags_before_any_work(data, tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    err = exits_with_usage_error(train_argv(data, out, flag, value), capsys)
    assert f"harma-fast train: error: argument {flag}: must be" in err and value in err
    assert not out.exists(), "a refused command wrote a run directory"


@pytest.mark.parametrize("argv", [["eval", "--test-file", "t.json", "--image-root", ".", "--batch-size", "0"],
                                  ["demo", "--steps", "0"], ["demo", "--minutes", "-2"],
                                  ["search", "lake", "--onnx", "o", "--images", "i", "--top-k", "-1"],
                                  ["search", "lake", "--onnx", "o", "--images", "i", "--top-k", "0"],
                                  ["export", "--out", "o", "--opset", "0"],
                                  ["train", "--precision", "fp16"], ["eval", "--test-file", "t", "--image-root", ".",
                                                                     "--backend", "cuda"]])
def test_every_command_checks_its_numbers_and_choices(argv, capsys):
    err = exits_with_usage_error(argv, capsys)
    assert f"harma-fast {argv[0]}: error: argument" in err


def test_a_missing_subcommand_is_named_as_the_usage_names_it(capsys):
    # `harma-fast data` said "the following arguments are required: data_command" (an internal name)
    err = exits_with_usage_error(["data"], capsys)
    assert err.splitlines()[-1] == "harma-fast data: error: the following arguments are required: command"


def test_eval_output_never_overwrites_a_file_it_did_not_write(data, tmp_path, capsys):
    # `eval --test-file t.json --output t.json` replaced the test split's annotations with metrics
    test = tmp_path / "test.json"
    test.write_bytes(data["test"].read_bytes())
    before = test.read_bytes()
    argv = ["eval", "--test-file", str(test), "--image-root", str(data["image_root"]), "--model", "HarMA-Tiny"]
    assert main([*argv, "--output", str(test)]) == 2
    assert test.read_bytes() == before
    assert f"--output {test} exists and is not a metrics file harma-fast eval wrote" in capsys.readouterr().err
    earlier = tmp_path / "metrics.json"  # an earlier eval's metrics are replaced
    earlier.write_text('{"r_mean": 1.0}')
    assert main([*argv, "--output", str(earlier), "--no-progress"]) == 0
    assert json.loads(earlier.read_text())["r_mean"] != 1.0


def test_search_html_never_overwrites_a_file_it_did_not_write(data, tmp_path, capsys):
    # `search --html` replaced whatever it was given (an image of the gallery, an annotation file)
    image = next(data["image_root"].iterdir())
    victim = tmp_path / image.name
    victim.write_bytes(image.read_bytes())
    assert main(["search", "lake", "--onnx", str(tmp_path / "o"), "--images", str(data["image_root"]),
                 "--html", str(victim)]) == 2
    assert victim.read_bytes() == image.read_bytes()
    assert f"--html {victim} exists and is not a page harma-fast search wrote" in capsys.readouterr().err


def test_train_flag_table_matches_train_config_defaults():
    from harma_fast import backend, cliargs
    from harma_fast.trainconfig import TRAIN_RULES

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert {k: defaults[k] for k in cli.TRAIN_DEFAULTS} == cli.TRAIN_DEFAULTS
    assert cliargs.BACKENDS == backend.BACKENDS
    assert all(TRAIN_RULES["precision"].ok(p) for p in cliargs.PRECISIONS)
    assert all(TRAIN_RULES["harma"].ok(h) for h in cliargs.HARMA_LAYOUTS)


# --- TrainConfig checks every field ------------------------------------------------------------
BAD_FIELDS = [("batch_size", 0), ("batch_size", -8), ("epochs", -1), ("epochs", 0), ("grad_accum", 0),
              ("eval_every", 0), ("save_every", 0), ("lr", 0.0), ("lr", math.nan), ("lr", math.inf), ("lr", "4e-4"),
              ("warmup", 1.0), ("warmup", -0.1), ("max_steps", 0), ("max_minutes", 0.0), ("num_workers", -1),
              ("eval_batch_size", 0), ("log_every", 0), ("temperature", 0.0), ("margin", -0.1), ("gamma", -1.0),
              ("clip_grad_norm", 0.0), ("precision", "fp16"), ("backend", "cuda"), ("fast", False), ("fast", "yes"),
              ("harma", "paperr"), ("device", "gpu"), ("max_words", 0), ("epochs", 2.5), ("epochs", True),
              ("betas", (0.9,)), ("compile", "no"), ("train_file", 3), ("seed", -1)]


@pytest.mark.parametrize("field, value", BAD_FIELDS)
def test_train_config_refuses_bad_fields(field, value):
    with pytest.raises(ConfigError, match=f"^{field} must be"):
        TrainConfig(**{field: value})


def test_train_config_accepts_edge_values_and_normalises_types():
    cfg = TrainConfig(warmup=0.0, num_workers=0, margin=0, gamma=0, lr=1, betas=[0.9, 0.98], max_steps=None,
                      device="cpu", fast="off", clip_grad_norm=None)
    assert cfg.betas == (0.9, 0.98) and isinstance(cfg.lr, float) and isinstance(cfg.margin, float)
    assert TrainConfig(device="cuda:1").device == "cuda:1"


# --- YAML presets ------------------------------------------------------------------------------
def preset(tmp_path, text):
    path = tmp_path / "my.yaml"
    path.write_text("train_file: t.json\nimage_root: imgs\n" + text)
    return str(path)


def test_yaml_lr_written_without_a_dot_is_a_number(tmp_path):
    # PyYAML (YAML 1.1) reads 4e-4 as the string "4e-4"; AdamW then failed with a TypeError
    cfg = train_config(build_parser().parse_args(["train", "--preset", preset(tmp_path, "lr: 4e-4\n")]))
    assert cfg.lr == 4e-4 and isinstance(cfg.lr, float)


def test_yaml_fast_off_means_off(tmp_path):
    # YAML 1.1 reads off/on as booleans
    cfg = train_config(build_parser().parse_args(["train", "--preset", preset(tmp_path, "fast: off\n")]))
    assert cfg.fast == "off"
    cfg = train_config(build_parser().parse_args(["train", "--preset", preset(tmp_path, "fast: on\n")]))
    assert cfg.fast == "on"


@pytest.mark.parametrize("text, key", [("lr: fast\n", "lr"), ("batch_size: 0\n", "batch_size"),
                                       ("epochs: ten\n", "epochs"), ("warmup: 1.5\n", "warmup"),
                                       ("betas: 0.9\n", "betas"), ("fast: 3\n", "fast"),
                                       ("learning_rate: 1e-4\n", "learning_rate")])
def test_bad_yaml_values_name_the_file_and_the_key(tmp_path, text, key):
    path = preset(tmp_path, text)
    with pytest.raises(ConfigError, match=f"preset {re.escape(path)}: .*{key}"):
        train_config(build_parser().parse_args(["train", "--preset", path]))


def test_invalid_yaml_preset_is_one_line_naming_file_and_line(tmp_path, capsys):
    # the parser's own message took seven lines and named the file "<unicode string>"
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 3\nlr: [1\n")
    assert main(["train", "--preset", str(path), "--train-file", "t.json", "--image-root", "."]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"harma-fast train: error: preset {path} is not valid YAML: ")
    assert "at line 3, column 1; fix the file" in err and "<unicode string>" not in err


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- lr\n- 1\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        train_config(build_parser().parse_args(["train", "--preset", str(path)]))


def test_bad_preset_through_main_is_one_line(tmp_path, capsys):
    path = preset(tmp_path, "batch_size: -8\n")
    assert main(["train", "--preset", path, "--output-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"harma-fast train: error: preset {path}: batch_size must be >= 1, got -8\n"
    assert not (tmp_path / "run").exists()


# --- the error boundary ------------------------------------------------------------------------
def fail_with(monkeypatch, error):
    def run_eval(args):
        raise error
    monkeypatch.setattr(cli, "run_eval", run_eval)
    return ["eval", "--test-file", "t.json", "--image-root", "."]


def test_expected_error_is_one_line_exit_2(monkeypatch, capsys):
    assert main(fail_with(monkeypatch, OutputPathError("--output x is a directory"))) == 2
    assert capsys.readouterr().err == "harma-fast eval: error: --output x is a directory\n"


def test_a_bug_shows_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    assert main(fail_with(monkeypatch, ZeroDivisionError("division by zero"))) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError" in err and "bug in harma-fast" in err and "report" in err


def test_a_value_error_from_outside_harma_fast_is_a_bug(monkeypatch, capsys):
    assert main(fail_with(monkeypatch, ValueError("operands could not be broadcast"))) == 1
    assert "bug in harma-fast" in capsys.readouterr().err


def test_an_input_check_of_harma_fast_is_one_line(data, tmp_path, capsys):
    # a ValueError raised by harma_fast's own check (here: an adapter file that is not one) is the user's to fix
    (tmp_path / "a.safetensors").write_bytes(b"not safetensors")
    assert main(eval_argv(data, "--adapters", str(tmp_path / "a.safetensors"))) == 2
    err = capsys.readouterr().err
    assert err.startswith("harma-fast eval: error: ") and "a.safetensors" in err and "Traceback" not in err


def test_interrupt_is_exit_130(monkeypatch, capsys):
    assert main(fail_with(monkeypatch, KeyboardInterrupt())) == 130
    assert "interrupted" in capsys.readouterr().err


def test_user_errors_of_the_library_are_harma_errors(tmp_path):
    from harma_fast.models import create_model

    with pytest.raises(HarmaError, match="unknown open_clip model"):
        create_model("ViT-B-33")
    with pytest.raises(HarmaError, match="pretrained checkpoint .*nope.pt does not exist"):
        create_model("HarMA-Tiny", str(tmp_path / "nope.pt"))
    with pytest.raises(FileNotFoundError):  # the old base class still catches it
        create_model("HarMA-Tiny", str(tmp_path / "nope.pt"))
    with pytest.raises(HarmaError, match="expects an open_clip or Hugging Face CLIP model"):
        harma_fast.patch(torch.nn.Linear(2, 2))


# --- output paths are checked before work, and nothing on disk is overwritten ------------------
def eval_argv(data, *extra):
    return ["eval", "--test-file", str(data["test"]), "--image-root", str(data["image_root"]), "--model",
            "HarMA-Tiny", *extra]


def test_eval_output_that_is_a_directory(data, tmp_path, capsys, no_model):
    assert main(eval_argv(data, "--output", str(tmp_path))) == 2
    assert f"--output {tmp_path} is a directory" in capsys.readouterr().err


def test_eval_output_below_a_file(data, tmp_path, capsys, no_model):
    (tmp_path / "f").write_text("keep me")
    assert main(eval_argv(data, "--output", str(tmp_path / "f" / "m.json"))) == 2
    assert f"{tmp_path / 'f'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep me"


def test_eval_missing_inputs_are_named(data, tmp_path, capsys, no_model):
    assert main(eval_argv(data, "--adapters", str(tmp_path / "a.safetensors"))) == 2
    assert f"--adapters {tmp_path / 'a.safetensors'} does not exist" in capsys.readouterr().err
    assert main(["eval", "--test-file", str(tmp_path / "t.json"), "--image-root", str(tmp_path)]) == 2
    assert f"--test-file {tmp_path / 't.json'} does not exist" in capsys.readouterr().err


def test_eval_failing_late_keeps_the_old_output(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "metrics.json"
    out.write_text('{"r_mean": 1.0}')  # an earlier eval's (another file is refused before any work)

    def broken_evaluate(*args, **kwargs):
        raise ConfigError("late failure")
    monkeypatch.setattr("harma_fast.evaluate.evaluate", broken_evaluate)
    assert main(eval_argv(data, "--output", str(out))) == 2
    assert out.read_text() == '{"r_mean": 1.0}' and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]
    assert "late failure" in capsys.readouterr().err


def test_eval_writes_its_output(data, tmp_path, capsys):
    out = tmp_path / "new" / "metrics.json"
    assert main(eval_argv(data, "--output", str(out), "--batch-size", "4")) == 0
    assert set(json.loads(out.read_text())) >= {"r_mean", "txt_r1", "img_r1"}



def test_eval_split_is_refused_on_a_one_split_file(data, capsys, no_model):
    # a HarMA-layout file is one split: "--split val" was ignored, test numbers read as validation's
    assert main(eval_argv(data, "--split", "val")) == 2
    err = capsys.readouterr().err
    assert "--split val" in err and "HarMA layout" in err and "drop --split" in err


def test_eval_split_picks_the_split_of_a_karpathy_file(data, tmp_path, monkeypatch):
    from harma_fast.data.synthetic_layouts import write_karpathy
    k = write_karpathy(data, tmp_path / "dataset.json")
    seen = []
    monkeypatch.setattr("harma_fast.evaluate.evaluate", lambda model, records, *a, **kw: seen.append(records) or {})
    titles = []
    monkeypatch.setattr("harma_fast.evaluate.format_metrics", lambda metrics, title: titles.append(title) or "")
    for split in (None, "val"):
        argv = ["eval", "--test-file", str(k), "--image-root", str(data["image_root"]), "--model", "HarMA-Tiny"]
        assert main(argv + (["--split", split] if split else [])) == 0
    test, val = (load_eval_records(data[s], data["image_root"]) for s in ("test", "val"))
    assert seen == [test, val]
    assert [t.split(":")[0] for t in titles] == [f"{k} (test split)", f"{k} (val split)"]  # which split it was


@pytest.mark.parametrize("precision, bf16", [("bf16", True), ("fp32", False), ("auto", False)])
def test_eval_precision_is_honoured_on_the_cpu(data, capsys, monkeypatch, precision, bf16):
    import open_clip
    seen = []
    encode = open_clip.CLIP.encode_image

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return encode(self, *args, **kwargs)
    monkeypatch.setattr(open_clip.CLIP, "encode_image", spy)
    assert main(eval_argv(data, "--precision", precision)) == 0
    assert seen and set(seen) == {bf16}  # bf16 was silently fp32 on the CPU

def test_export_out_below_a_file(tmp_path, capsys, no_model):
    (tmp_path / "f").write_text("")
    assert main(["export", "--model", "HarMA-Tiny", "--out", str(tmp_path / "f" / "onnx")]) == 2
    assert "--out" in capsys.readouterr().err


def test_demo_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("keep me")
    assert main(["demo", "--output-dir", str(tmp_path / "f"), "--steps", "1"]) == 2
    assert f"--output-dir {tmp_path / 'f'} is a file" in capsys.readouterr().err
    assert (tmp_path / "f").read_text() == "keep me"


# --- help pages --------------------------------------------------------------------------------
def subparsers():
    """The top parser and every sub-command, nested ones (``data check``) by their full name."""
    parser = build_parser()

    def walk(p, prefix):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield f"{prefix}{name}", sub
                    yield from walk(sub, f"{prefix}{name} ")

    return parser, dict(walk(parser, ""))


def test_every_help_page_has_a_description_and_shows_defaults(capsys):
    parser, commands = subparsers()
    assert set(commands) == {"train", "eval", "demo", "data", "data check", "export", "search"}
    for name, sub in [("harma-fast", parser), *commands.items()]:
        assert sub.description, f"{name} --help has no description"
        page = sub.format_help()
        for action in sub._actions:
            if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and \
                    not isinstance(action, argparse._StoreFalseAction):  # a --no-X switch: "default: True" misleads
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                assert "default" in sub._get_formatter()._get_help_string(action), \
                    f"{name} {action.option_strings[0]} does not show its default {action.default!r}"
        assert "(default: " in page or name in ("harma-fast", "data"), f"{name} --help shows no default"
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0 and "(default: ViT-B-32)" in " ".join(capsys.readouterr().out.split())


# --- search ------------------------------------------------------------------------------------
class FakeEncoder:
    """OrtEncoder's interface without an export: an image's embedding is its mean colour."""

    def __init__(self, onnx_dir, *args, **kwargs):
        from open_clip.tokenizer import default_bpe

        from harma_fast.export.tokenizer import BPETokenizer

        self.meta = {"export_id": "fake"}
        self.embed_dim = 3
        self.tokenizer = BPETokenizer(default_bpe(), context_length=16)

    def preprocess(self, path):
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"), np.float32).mean((0, 1)) + 1.0

    def encode_pixels(self, pixels):
        return pixels / (pixels ** 2).sum(1, keepdims=True) ** 0.5

    def require_text(self):
        pass

    def encode_texts(self, texts):
        import numpy as np

        return np.tile(np.array([[1.0, 0.0, 0.0]], np.float32), (len(texts), 1))


@pytest.fixture
def gallery(tmp_path, monkeypatch):
    from PIL import Image

    import harma_fast.export.runtime

    monkeypatch.setattr(harma_fast.export.runtime, "OrtEncoder", FakeEncoder)
    monkeypatch.setenv("HARMA_FAST_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "tiles"
    folder.mkdir()
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250), (120, 120, 0)]):
        Image.new("RGB", (8, 8), colour).save(folder / f"{i}.png")
    return folder


def search_argv(folder, query, *extra):
    return ["search", query, "--onnx", "unused", "--images", str(folder), *extra]


def test_search_labels_scores_as_cosine_similarity(gallery, capsys):
    assert main(search_argv(gallery, "a red roof", "--top-k", "2")) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 2 and lines[0].split()[:2] == ["1", "cos"] and lines[0].endswith("0.png")
    assert "cosine similarity" in captured.err


@pytest.mark.parametrize("query", ["", "   ", "...", "!!! ??? ,,,"])
def test_search_refuses_an_empty_query(gallery, capsys, query):
    # punctuation alone is cleaned to '' (as encode_texts cleans queries): it ranked by an empty caption
    assert main(search_argv(gallery, query)) == 2
    assert f"the query {query!r} is empty" in capsys.readouterr().err
    from harma_fast.export.search import GalleryIndex

    with pytest.raises(ConfigError, match="is empty"):
        GalleryIndex(gallery, FakeEncoder("unused")).search(query)


def test_search_warns_when_the_query_is_truncated(gallery, capsys):
    assert main(search_argv(gallery, "a red roof", "--top-k", "1")) == 0
    assert "truncated" not in capsys.readouterr().err
    assert main(search_argv(gallery, " ".join(["red roof"] * 20), "--top-k", "1")) == 0
    assert "warning: the query is 40 tokens long but the text encoder reads 14; it was truncated" in \
        capsys.readouterr().err


def test_search_top_k_must_be_positive(gallery):
    from harma_fast.export.search import GalleryIndex

    index = GalleryIndex(gallery, FakeEncoder("unused"))
    assert len(index.search("a lake", 10)) == 4
    for bad in (0, -1):
        with pytest.raises(ConfigError, match="top_k .* must be an integer >= 1"):
            index.search("a lake", bad)


def test_search_index_may_be_a_folder(gallery, tmp_path, capsys):
    folder = tmp_path / "indexes"
    folder.mkdir()
    assert main(search_argv(gallery, "a lake", "--index", str(folder))) == 0
    assert len(list(folder.glob("*.npz"))) == 1
    assert main(search_argv(gallery, "a lake", "--index", str(folder))) == 0
    assert "index reused: 4 images unchanged" in capsys.readouterr().err
    assert main(search_argv(gallery, "a lake", "--index", str(tmp_path / "one.npz"))) == 0
    assert (tmp_path / "one.npz").is_file()


@pytest.mark.parametrize("flag", ["--html", "--index"])
def test_search_outputs_below_a_file_are_refused_before_embedding(gallery, tmp_path, capsys, flag):
    (tmp_path / "f").write_text("keep me")
    assert main(search_argv(gallery, "a lake", flag, str(tmp_path / "f" / "out.npz"))) == 2
    assert f"{flag} {tmp_path / 'f' / 'out.npz'} cannot be written" in capsys.readouterr().err
    assert not (tmp_path / "cache").exists(), "the folder was embedded before the path was checked"
    assert (tmp_path / "f").read_text() == "keep me"


def test_evaluate_refuses_a_batch_size_below_one(data):
    from harma_fast.data.annotations import load_eval_records
    from harma_fast.evaluate import evaluate

    records = load_eval_records(data["test"], data["image_root"])
    with pytest.raises(ConfigError, match="batch size must be an integer >= 1, got 0"):
        evaluate(torch.nn.Identity(), records, None, None, batch_size=0)


def test_search_never_overwrites_a_file_that_is_not_an_index(gallery, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(search_argv(gallery, "a lake", "--index", str(tmp_path / "notes.txt"))) == 2
    assert "is not a .npz file name" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_export_input_files_are_checked_before_work(tmp_path, capsys, no_model):
    # every file flag of export is checked up front: exit 2 naming the flag, never a crash (exit 1)
    for flag in ("--adapters", "--released", "--check-file"):
        assert main(["export", "--model", "HarMA-Tiny", flag, str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
        assert flag in capsys.readouterr().err
    argv = ["export", "--model", "HarMA-Tiny", "--image-root", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2 and "--image-root" in capsys.readouterr().err


def test_no_switches_do_not_say_default_true(capsys):
    for argv in (["demo", "--help"], ["eval", "--help"], ["data", "check", "--help"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "(default: True)" not in capsys.readouterr().out


def test_a_pretrained_folder_is_named_as_a_folder(tmp_path):
    from harma_fast.errors import InputPathError
    with pytest.raises(InputPathError, match="is a folder, not a weights file.*goes to --model"):
        harma_fast.create_model("HarMA-Tiny", pretrained=str(tmp_path))


def test_a_closed_output_pipe_is_not_an_input_error(data):
    import subprocess
    # `harma-fast eval ... | head -0`: the reader is gone before the table is printed
    proc = subprocess.run(f"{sys.executable} -m harma_fast.cli eval --test-file {data['test']} --image-root "
                          f"{data['image_root']} --model HarMA-Tiny --no-progress | true; exit ${{PIPESTATUS[0]}}",
                          shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 141), proc.stderr  # 0 if the table fitted the pipe's buffer first
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr


def test_a_process_left_by_its_peer_under_torchrun_is_not_a_bug(monkeypatch, capsys):
    # one rank stops on a bad image (its own clear error); the other's collective then fails with
    # gloo's "Connection closed by peer", which was printed as a traceback and "a bug in harma-fast"
    def lost(args):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                           "[127.0.0.1]:51234")
    monkeypatch.setattr(cli, "_run", lost)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["data", "check", "x.json", "--image-root", "."]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "another process of this job stopped (" in err and "bug" not in err
    monkeypatch.setenv("WORLD_SIZE", "1")  # the same error outside a multi-process job is still a bug
    assert main(["data", "check", "x.json", "--image-root", "."]) == 1


def test_the_cache_folder_is_checked_before_embedding_and_named(gallery, tmp_path, monkeypatch, capsys):
    # a file as HARMA_FAST_CACHE: every image was embedded, then "[Errno 20] Not a directory"
    (tmp_path / "cachefile").write_text("keep me")
    monkeypatch.setenv("HARMA_FAST_CACHE", str(tmp_path / "cachefile"))
    monkeypatch.setattr(FakeEncoder, "preprocess", lambda *a: pytest.fail("the gallery was embedded first"))
    assert main(search_argv(gallery, "a lake")) == 2
    err = capsys.readouterr().err
    assert f"cachefile is a file, not a folder (HARMA_FAST_CACHE is {tmp_path / 'cachefile'}; set HARMA_FAST_CACHE" in err
    assert (tmp_path / "cachefile").read_text() == "keep me"


def test_an_empty_cache_variable_means_the_default_cache(gallery, tmp_path, monkeypatch):
    # HARMA_FAST_CACHE= wrote ./gallery/ into the folder search ran in
    monkeypatch.setenv("HARMA_FAST_CACHE", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(search_argv(gallery, "a lake")) == 0
    assert not (tmp_path / "gallery").exists()
    assert len(list((tmp_path / "home" / ".cache" / "harma_fast" / "gallery").glob("*.npz"))) == 1


def test_search_html_shows_file_names_that_are_not_utf8(gallery, tmp_path, capsys):
    # a name with a byte that is not UTF-8 (bad\xff.png) raised UnicodeEncodeError writing the page
    import os
    import shutil

    bad = os.fsdecode(b"bad\xff<b>.png")
    shutil.copy(gallery / "0.png", os.path.join(str(gallery), bad))
    page = tmp_path / "page.html"
    assert main(search_argv(gallery, "a red roof", "--top-k", "5", "--html", str(page))) == 0
    text = page.read_text(encoding="utf-8")
    assert "bad\\xff&lt;b&gt;.png" in text and text.count("<img ") == 5
    assert "bad\\xff<b>.png" in capsys.readouterr().out  # stdout may be strict UTF-8 too


def test_export_option_errors_name_the_flags(tmp_path, capsys, no_model):
    # they named the Python arguments (dtype='int8' ... fused=False) on the command line too
    argv = ["export", "--model", "HarMA-Tiny", "--out", str(tmp_path / "o")]
    assert main([*argv, "--dtype", "int8", "--plain-onnx"]) == 2
    assert "error: --dtype int8 quantizes the fused graphs; drop --plain-onnx" in capsys.readouterr().err
    assert main([*argv, "--check-file", __file__, "--image-root", str(tmp_path)]) == 2
    assert "error: --check-file judges int8 retrieval: it needs --dtype int8, both towers and --image-root" in \
        capsys.readouterr().err


def test_eval_reads_the_weights_before_every_image(data, tmp_path, capsys, monkeypatch):
    # a wrong checkpoint was named only after every image of the split had been opened (minutes
    # on a large dataset): the weights are read first
    import harma_fast.data.annotations as annotations

    def no_images(*args, **kwargs):
        raise AssertionError("the images were read before the checkpoint")
    monkeypatch.setattr(annotations, "load_eval_records", no_images)
    not_released = tmp_path / "plain.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, not_released)
    assert main(eval_argv(data, "--released", str(not_released))) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(not_released) in err and "images were read" not in err


def test_paths_a_preset_filled_in_are_named_as_the_presets(tmp_path, capsys, monkeypatch):
    # "data/rsitmd/rsitmd_val.json: the annotation file does not exist" for a path the user never typed
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "rsitmd" / "images").mkdir(parents=True)
    assert main(["train", "--preset", "rsitmd-clip", "--train-file", "mine.json"]) == 2
    err = capsys.readouterr().err
    assert "mine.json" in err and "data/rsitmd/rsitmd_val.json" in err
    assert "(preset rsitmd-clip set --val-file, --test-file: point them at your copy" in err
    # every path given: nothing is blamed on the preset
    assert main(["train", "--preset", "rsitmd-clip", "--train-file", "a.json", "--val-file", "b.json",
                 "--test-file", "c.json"]) == 2
    assert "preset rsitmd-clip set" not in capsys.readouterr().err


def test_an_interrupted_run_says_what_it_kept(monkeypatch, capsys):
    from harma_fast.train import RunInterrupted

    assert main(fail_with(monkeypatch, RunInterrupted("Last good checkpoint: r/last.pt (step 2)"))) == 130
    assert capsys.readouterr().err == "harma-fast eval: interrupted. Last good checkpoint: r/last.pt (step 2)\n"
