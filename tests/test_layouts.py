"""The three dataset layouts (HarMA, Karpathy, NWPU-Captions), their errors, and the CLI that reads them."""
import json
import shutil

import pytest

from harma_fast.cli import build_parser, main, train_config
from harma_fast.data.annotations import AnnotationError, load_eval_records, load_splits, load_train_records
from harma_fast.data.synthetic import generate
from harma_fast.data.synthetic_layouts import write_karpathy, write_nwpu
from harma_fast.errors import ConfigError, HarmaError


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("layouts")
    paths = generate(out / "harma", n_train=10, n_val=4, n_test=5, image_size=48, seed=4)
    paths["karpathy"] = write_karpathy(paths, out / "dataset_synthetic.json")
    paths["nwpu"] = write_nwpu(paths, out / "nwpu")
    return paths


def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def by_image(records):
    """Order-free view of a split: image file name -> its captions, and which images share an id."""
    if hasattr(records, "image_ids"):
        captions, ids = {}, {}
        for image, caption, i in zip(records.images, records.captions, records.image_ids, strict=True):
            captions.setdefault(image.name, []).append(caption)
            ids.setdefault(i, set()).add(image.name)
        return captions, sorted(sorted(names) for names in ids.values())
    captions = {}
    for t, caption in enumerate(records.captions):
        captions.setdefault(records.images[records.text_to_image[t]].name, []).append(caption)
    return captions, None


def test_every_layout_reads_into_the_same_records(synth):
    harma = load_splits(synth["train"], synth["val"], synth["test"], synth["image_root"])
    assert (len(harma.train), len(harma.val), len(harma.test)) == (50, 4, 5)
    # Karpathy: one file for the three splits, raw captions capitalised as RSICD's: the very same records
    k = synth["karpathy"]
    assert load_splits(k, k, k, synth["image_root"]) == harma
    assert "An aerial view" in k.read_text() or "Sandy desert" in k.read_text()
    # NWPU: grouped by class, images in class folders: the same images, captions and id groups
    n, root = synth["nwpu"]["annotations"], synth["nwpu"]["image_root"]
    nwpu = load_splits(n, n, n, root)
    for split in ("train", "val", "test"):
        assert by_image(getattr(nwpu, split)) == by_image(getattr(harma, split)), split
    labels = {r["image"]: r["label_name"] for r in json.loads(synth["val"].read_text())}
    assert all(p.parent == root / labels[p.name] for p in nwpu.val.images)
    assert sorted(set(nwpu.train.image_ids)) == list(range(10))


def test_one_file_feeds_each_split_by_name(synth):
    k = synth["karpathy"]
    assert load_train_records(k, synth["image_root"]) == load_train_records(synth["train"], synth["image_root"])
    assert load_eval_records(k, synth["image_root"], split="val") == load_eval_records(synth["val"], synth["image_root"])
    assert load_eval_records(k, synth["image_root"]).images == load_eval_records(synth["test"], synth["image_root"]).images


def test_malformed_karpathy_file_names_file_record_and_field(synth, tmp_path):
    data = json.loads(synth["karpathy"].read_text())
    images = data["images"]
    del images[0]["filename"]
    images[1]["split"] = "dev"
    del images[2]["sentences"][1]["raw"], images[2]["sentences"][1]["tokens"]
    images[3]["imgid"] = images[4]["imgid"]
    images[5]["filename"] = "missing.tif"
    images[6]["sentences"] = []
    images[7]["imgid"] = [7]
    images[9]["filename"] = images[8]["filename"]
    bad = write(tmp_path / "dataset_bad.json", data)
    with pytest.raises(AnnotationError) as info:
        load_splits(bad, bad, bad, synth["image_root"])
    text = str(info.value)
    assert "problem(s) in annotation file" in text and "dataset_bad.json" in text
    for expected in ("record images[0], field 'filename': missing",
                     "record images[1], field 'split': 'dev' is not one of train, val, test",
                     "record images[2], field 'sentences[1].raw': no caption text",
                     "record images[4], field 'imgid': 4 is already used by record images[3]",
                     "record images[5], field 'filename': image 'missing.tif' not found",
                     "record images[6], field 'sentences': missing or not a non-empty list",
                     "record images[7], field 'imgid': [7] is not an image id",
                     f"record images[9], field 'filename': '{images[8]['filename']}' is already used by record images[8]"):
        assert expected in text, expected
    assert isinstance(info.value, HarmaError) and isinstance(info.value, ValueError)


def test_malformed_nwpu_file_names_file_record_and_field(synth, tmp_path):
    data = json.loads(synth["nwpu"]["annotations"].read_text())
    label, records = next(iter(data.items()))
    del records[0]["raw"]
    records[1]["raw_2"] = "  !! "
    records[-1]["filename"] = "elsewhere.tif"
    data["not a class"] = "oops"
    bad = write(tmp_path / "dataset_nwpu.json", data)
    with pytest.raises(AnnotationError) as info:
        load_train_records(bad, synth["nwpu"]["image_root"], split=records[1]["split"])
    text = str(info.value)
    assert "dataset_nwpu.json" in text
    assert f"record {label}[0], field 'raw': missing" in text
    assert f"record {label}[1], field 'raw_2': no caption text" in text
    assert "record not a class: expected the list of the class's images, found a str" in text
    if records[-1]["split"] == records[1]["split"]:  # images are only opened for the split read
        assert f"field 'filename': image '{label}/elsewhere.tif' not found" in text


def test_unrecognised_layout_and_missing_split(synth, tmp_path):
    with pytest.raises(AnnotationError, match="expected a JSON list of records \\(HarMA layout\\), .*Karpathy.*NWPU"):
        load_train_records(write(tmp_path / "x.json", {"annotations": 3}), synth["image_root"])
    data = json.loads(synth["karpathy"].read_text())
    data["images"] = [im for im in data["images"] if im["split"] != "val"]
    no_val = write(tmp_path / "no_val.json", data)
    with pytest.raises(AnnotationError, match="field 'split': no images with split 'val' \\(the file has 5 test, 10 train"):
        load_eval_records(no_val, synth["image_root"], split="val")


def test_evaluation_file_with_repeated_images_or_single_string_captions_is_refused(synth, tmp_path):
    # issue 11: a training-layout file given for evaluation used to score a gallery of repeated images
    with pytest.raises(AnnotationError, match="every caption is a single string and 40 records repeat an image: "
                                              "this is a training file"):
        load_eval_records(synth["train"], synth["image_root"])
    records = json.loads(synth["test"].read_text())
    records[1]["caption"] = records[1]["caption"][0]
    records[3]["image"] = records[0]["image"]
    with pytest.raises(AnnotationError) as info:
        load_eval_records(write(tmp_path / "test.json", records), synth["image_root"])
    text = str(info.value)
    assert "record 1, field 'caption': is a single string: an evaluation file holds one record per image" in text
    assert f"record 3, field 'image': '{records[0]['image']}' repeats record 0" in text
    with pytest.raises(AnnotationError, match="every caption is a list: this is an evaluation file"):
        load_train_records(synth["test"], synth["image_root"])


def test_problems_of_every_file_are_reported_at_once(synth, tmp_path, capsys):
    # issue 11: val.json's problems used to stop the run before test.json was even read
    val = json.loads(synth["val"].read_text())
    val[2]["caption"] = []
    bad_val = write(tmp_path / "val.json", val)
    args = ["train", "--train-file", str(synth["train"]), "--val-file", str(bad_val), "--test-file",
            str(tmp_path / "test.json"), "--image-root", str(synth["image_root"]), "--model", "HarMA-Tiny",
            "--output-dir", str(tmp_path / "run")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "2 problem(s) in 2 annotation files" in err
    assert f"{bad_val}: 1 problem(s)\n  record 2, field 'caption': no caption" in err
    assert f"{tmp_path / 'test.json'}: 1 problem(s)\n  the annotation file does not exist" in err


def test_data_check_summarises_and_reports(synth, tmp_path, capsys):
    assert main(["data", "check", str(synth["karpathy"]), "--image-root", str(synth["image_root"])]) == 0
    out = capsys.readouterr().out
    assert "Karpathy layout" in out and "no problems found" in out
    assert "images checked: 19; missing: 0; unreadable: 0" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:5]}
    assert rows == {"train": ["10", "50", "5.00", "5-5"], "val": ["4", "20", "5.00", "5-5"],
                    "test": ["5", "25", "5.00", "5-5"]}
    root = tmp_path / "images"
    shutil.copytree(synth["nwpu"]["image_root"], root)
    victim = next(root.glob("*/*.tif"))
    victim.unlink()
    assert main(["data", "check", str(synth["nwpu"]["annotations"]), "--image-root", str(root)]) == 2
    out = capsys.readouterr().out
    assert "NWPU-Captions layout" in out and "missing: 1; unreadable: 0" in out
    assert f"missing: {victim}" in out and f"image '{victim.relative_to(root)}' not found" in out


def test_data_flag_fills_the_split_files_and_explicit_flags_win(synth):
    k = str(synth["karpathy"])
    cfg = train_config(build_parser().parse_args(["train", "--preset", "rsicd-clip", "--data", k,
                                                  "--image-root", "imgs"]))
    assert (cfg.train_file, cfg.val_file, cfg.test_file) == (k, k, k)
    cfg = train_config(build_parser().parse_args(["train", "--data", k, "--val-file", "v.json", "--image-root", "i"]))
    assert (cfg.train_file, cfg.val_file, cfg.test_file) == (k, "v.json", k)
    with pytest.raises(ConfigError, match="--data .*train.json: this file is in the HarMA layout"):
        train_config(build_parser().parse_args(["train", "--data", str(synth["train"]), "--image-root", "i"]))


def test_training_and_evaluation_run_from_a_karpathy_file(synth, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(synth["karpathy"]), "--image-root", str(synth["image_root"]),
                 "--model", "HarMA-Tiny", "--batch-size", "16", "--epochs", "1", "--max-steps", "2",
                 "--num-workers", "0", "--output-dir", str(run)]) == 0
    result = json.loads((run / "result.json").read_text())
    assert result["step"] == 2 and 0 <= result["test"]["r_mean"] <= 100
    config = json.loads((run / "config.json").read_text())
    assert config["train_file"] == config["val_file"] == config["test_file"] == str(synth["karpathy"])
    capsys.readouterr()
    assert main(["eval", "--test-file", str(synth["karpathy"]), "--split", "val", "--image-root",
                 str(synth["image_root"]), "--model", "HarMA-Tiny"]) == 0
    assert "4 images, 20 captions" in capsys.readouterr().out
    # issue 11: a training file given to eval is refused, not scored
    assert main(["eval", "--test-file", str(synth["train"]), "--image-root", str(synth["image_root"]),
                 "--model", "HarMA-Tiny"]) == 2
    assert "this is a training file" in capsys.readouterr().err


def test_a_split_that_is_a_list_or_an_object_is_a_problem_of_its_record(synth, tmp_path, capsys):
    # review D4: such a split crashed (unhashable) data check, train and eval
    data = json.loads(synth["karpathy"].read_text())
    data["images"][0]["split"], data["images"][1]["split"] = ["test"], {"a": 1}
    bad = write(tmp_path / "dataset_bad.json", data)
    with pytest.raises(AnnotationError) as info:
        load_splits(bad, bad, bad, synth["image_root"])
    assert "record images[0], field 'split': ['test'] is not one of train, val, test (or restval)" in str(info.value)
    assert "record images[1], field 'split': {'a': 1} is not one of train, val, test" in str(info.value)
    assert main(["data", "check", str(bad), "--image-root", str(synth["image_root"])]) == 2
    assert "record images[0], field 'split': ['test'] is not one of" in capsys.readouterr().out
    nwpu = json.loads(synth["nwpu"]["annotations"].read_text())
    label, records = next(iter(nwpu.items()))
    records[0]["split"] = [records[0]["split"]]
    with pytest.raises(AnnotationError, match=rf"record {label}\[0\], field 'split': \['\w+'\] is not one of"):
        load_eval_records(write(tmp_path / "dataset_nwpu.json", nwpu), synth["nwpu"]["image_root"])


def test_data_check_reports_a_file_without_one_usable_record(synth, tmp_path, capsys):
    # review D5: data check crashed (KeyError) on such a file instead of saying what is wrong with it
    misspelled = json.loads(synth["karpathy"].read_text())
    for image in misspelled["images"]:
        image["split"] = "testing"
    no_raw = json.loads(synth["nwpu"]["annotations"].read_text())
    for records in no_raw.values():
        for record in records:
            del record["raw"]
    label = next(iter(no_raw))
    for data, root, expected in ((misspelled, synth["image_root"], "record images[0], field 'split': 'testing' is "
                                  "not one of train, val, test"),
                                 ({"images": []}, synth["image_root"], "the file holds no records"),
                                 (no_raw, synth["nwpu"]["image_root"], f"record {label}[0], field 'raw': missing")):
        path = write(tmp_path / "dataset.json", data)
        assert main(["data", "check", str(path), "--image-root", str(root)]) == 2
        out, err = capsys.readouterr()
        assert "problem(s) in annotation file" in out and expected in out and "internal error" not in err, expected


def test_karpathy_sub_folders_may_hold_files_of_the_same_name(synth, tmp_path):
    # COCO-style `filepath` folders, no imgid: the id was the bare file name, so two folders' "0.png"
    # were refused as one image described twice
    import shutil
    data = json.loads(synth["karpathy"].read_text())
    root = tmp_path / "images"
    for i, image in enumerate(data["images"]):
        del image["imgid"]
        folder = f"part{i % 2}"
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(synth["image_root"] / image["filename"], root / folder / f"{i // 2}.png")
        image["filepath"], image["filename"] = folder, f"{i // 2}.png"
    path = write(tmp_path / "dataset_coco_style.json", data)
    splits = load_splits(path, path, path, root)
    reference = load_splits(synth["karpathy"], synth["karpathy"], synth["karpathy"], synth["image_root"])
    for name in ("train", "val", "test"):
        assert getattr(splits, name).captions == getattr(reference, name).captions, name
    assert len(set(splits.train.image_ids)) == len(set(reference.train.image_ids))
