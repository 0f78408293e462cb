"""data.prepare: each converter on a tiny fake copy of its dataset's published layout, read back
through the training loader; plus --check, --skip_bad, overwrite and error handling."""
import io
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import scipy.io
from PIL import Image

from data import ImageDataset, LMDBReader, write_lmdb
from data.prepare import get_args_parser, main
from errors import UserError

from helpers import (COLOURS, FAKES, REPO, fake_cub, fake_dtd, fake_imagefolder, fake_vgg_flower_102, save_jpeg,
                     write_text)


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def assert_split(out, name, split, per_label, colours):
    """Counts, labels and pixels, as the training loader sees them."""
    dataset = ImageDataset(name, split, data_dir=str(out), image_size=16)
    assert len(dataset) == sum(per_label)
    found = Counter()
    for i in range(len(dataset)):
        image, label = dataset[i]
        found[label] += 1
        assert image.shape == (3, 16, 16)
        mean = image.double().mean(dim=(1, 2)).numpy()
        np.testing.assert_allclose(mean, colours[label], atol=6)
    assert [found[label] for label in range(len(per_label))] == per_label


# ---------------------------------------------------------------- converters

@pytest.mark.parametrize("dataset", sorted(FAKES))
def test_converter_round_trip(tmp_path, capsys, dataset):
    src, classes, per_label, colours = FAKES[dataset](str(tmp_path / "src"))
    out = tmp_path / "data"
    name = "mine" if dataset == "imagefolder" else dataset
    run(dataset, "--src", src, "--out", out, "--name", name, "--workers", 2)

    for split in ("train", "test"):
        assert_split(out, name, split, per_label[split], colours)
    assert sorted(os.listdir(out / name)) == ["counts.json", "test.lmdb", "train.lmdb"]
    assert [e for e in os.listdir(out) if e.startswith(".")] == []
    counts = json.loads((out / name / "counts.json").read_text())
    assert list(counts) == ["name", "dataset", "src", "resize", "num_classes", "classes", "splits", "expected"]
    assert counts["classes"] == classes and counts["num_classes"] == len(classes)
    for split in ("train", "test"):
        assert counts["splits"][split]["total"] == sum(per_label[split])
        assert list(counts["splits"][split]["per_class"].values()) == per_label[split]
        assert counts["splits"][split]["skipped"] == []
    stdout, stderr = capsys.readouterr()
    assert f"counts stored in {out / name / 'counts.json'}" in stdout
    if dataset != "imagefolder":  # the fakes are tiny: a warning, not a failure
        assert f"warning: {dataset} train: expected" in stderr
        assert f"found {sum(per_label['train'])}" in stderr


def test_resize_stores_jpeg_with_shorter_side_n(tmp_path):
    src, _, per_label, colours = fake_cub(str(tmp_path / "src"))
    out = tmp_path / "data"
    run("cub", "--src", src, "--out", out, "--resize", 4)
    image_bytes, _ = LMDBReader(str(out / "cub" / "train.lmdb"))[0]
    with Image.open(io.BytesIO(image_bytes)) as img:
        assert img.format == "JPEG" and img.size == (6, 4)  # 12 x 8 originals, aspect kept
    assert json.loads((out / "cub" / "counts.json").read_text())["resize"] == 4
    for split in ("train", "test"):
        assert_split(out, "cub", split, per_label[split], colours)


def test_original_bytes_are_stored_exactly(tmp_path):
    src, *_ = fake_dtd(str(tmp_path / "src"))
    run("dtd", "--src", src, "--out", tmp_path / "data")
    reader = LMDBReader(str(tmp_path / "data" / "dtd" / "test.lmdb"))
    stored = {reader[i][0] for i in range(len(reader))}
    test_files = (tmp_path / "src" / "dtd" / "labels" / "test1.txt").read_text().split()
    assert stored == {(tmp_path / "src" / "dtd" / "images" / f).read_bytes() for f in test_files}


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("dataset, missing", [
    ("aircraft", "data/images_variant_test.txt"), ("cub", "train_test_split.txt"), ("dtd", "labels/val1.txt"),
    ("stanford_dogs", "test_list.mat"), ("vgg_flower_102", "setid.mat"), ("chest_xray", "chest_xray/test"),
    ("cub", "images")])
def test_missing_index_file_is_named(tmp_path, dataset, missing):
    src, *_ = FAKES[dataset](str(tmp_path / "src"))
    path = os.path.join(src, missing)
    shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    with pytest.raises(UserError, match="missing .*" + os.path.basename(missing)):
        run(dataset, "--src", src, "--out", tmp_path / "data")
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []


def test_command_line_error_is_one_line_exit_2(tmp_path):
    src, *_ = fake_cub(str(tmp_path / "src"))
    os.remove(os.path.join(src, "images.txt"))
    result = subprocess.run([sys.executable, "-m", "data.prepare", "cub", "--src", src, "--out", str(tmp_path / "d")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: missing {os.path.join(src, 'images.txt')} (expected CUB-200-2011: images.txt, "
        f"image_class_labels.txt, train_test_split.txt, classes.txt, images/)"]


def corrupt_one_test_image(src):
    """Truncates the first test image of fake_cub; returns its path."""
    for line in open(os.path.join(src, "train_test_split.txt")):
        image_id, is_train = line.split()
        if is_train == "0":
            break
    rel = dict(line.split() for line in open(os.path.join(src, "images.txt")))[image_id]
    path = os.path.join(src, "images", rel)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    return path


def test_bad_image_stops_the_build_and_leaves_nothing(tmp_path):
    src, *_ = fake_cub(str(tmp_path / "src"))
    bad = corrupt_one_test_image(src)
    out = tmp_path / "data"
    with pytest.raises(UserError, match=f"cannot read image {bad}.*--skip_bad"):
        run("cub", "--src", src, "--out", out)
    # train.lmdb was complete when test failed: neither may be left where a build looks finished
    assert os.listdir(out) == []


def test_skip_bad_lists_and_skips(tmp_path, capsys):
    src, _, per_label, colours = fake_cub(str(tmp_path / "src"))
    bad = corrupt_one_test_image(src)
    out = tmp_path / "data"
    run("cub", "--src", src, "--out", out, "--skip_bad")
    counts = json.loads((out / "cub" / "counts.json").read_text())
    assert counts["splits"]["test"]["skipped"] == [bad]
    assert counts["splits"]["test"]["total"] == sum(per_label["test"]) - 1
    assert counts["splits"]["train"]["total"] == sum(per_label["train"])
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err
    dataset = ImageDataset("cub", "test", data_dir=str(out), image_size=16)
    assert len(dataset) == sum(per_label["test"]) - 1


def test_missing_listed_image_stops_before_building(tmp_path):
    src, *_ = fake_vgg_flower_102(str(tmp_path / "src"))
    missing = os.path.join(src, "jpg", "image_00007.jpg")
    os.remove(missing)
    with pytest.raises(UserError, match=f"missing image {missing}"):
        run("vgg_flower_102", "--src", src, "--out", tmp_path / "data")
    run("vgg_flower_102", "--src", src, "--out", tmp_path / "data", "--skip_bad")
    counts = json.loads((tmp_path / "data" / "vgg_flower_102" / "counts.json").read_text())
    assert counts["splits"]["test"]["skipped"] == [missing]


def test_existing_target_is_replaced_only_with_overwrite_and_only_when_complete(tmp_path):
    src, *_ = fake_cub(str(tmp_path / "src"))
    out = tmp_path / "data"
    run("cub", "--src", src, "--out", out)
    first = (out / "cub" / "train.lmdb").read_bytes()
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run("cub", "--src", src, "--out", out, "--resize", 4)
    assert (out / "cub" / "train.lmdb").read_bytes() == first

    corrupt_one_test_image(src)  # the new build fails halfway: the old one must survive intact
    with pytest.raises(UserError, match="cannot read image"):
        run("cub", "--src", src, "--out", out, "--resize", 4, "--overwrite")
    assert (out / "cub" / "train.lmdb").read_bytes() == first
    assert sorted(os.listdir(out)) == ["cub"]

    run("cub", "--src", src, "--out", out, "--resize", 4, "--overwrite", "--skip_bad")
    assert json.loads((out / "cub" / "counts.json").read_text())["resize"] == 4
    new, old = sorted(os.listdir(out))  # the old one moved aside, not deleted
    assert new == "cub" and old.startswith("cub.old-") and (out / old / "train.lmdb").read_bytes() == first


def test_refuses_to_build_over_its_own_source(tmp_path):
    src, *_ = fake_imagefolder(str(tmp_path / "data" / "mine"))
    with pytest.raises(UserError, match="inside the output"):
        run("imagefolder", "--src", src, "--out", tmp_path / "data", "--name", "mine", "--overwrite")


# ---------------------------------------------------------------- --check

def png(colour, width=5):
    buf = io.BytesIO()
    Image.new("RGB", (width, 4), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_check_accepts_a_good_build_and_rejects_a_corrupted_one(tmp_path, capsys):
    src, *_ = fake_dtd(str(tmp_path / "src"))
    out = tmp_path / "data"
    run("dtd", "--src", src, "--out", out)
    capsys.readouterr()
    counts = run("--check", "dtd", "--out", out)
    assert counts["train"]["per_class"] == {"banded": 2, "dotted": 2, "zigzagged": 3}
    assert "ok, every record decodes" in capsys.readouterr().out

    os.remove(out / "dtd" / "train.lmdb")
    write_lmdb(str(out / "dtd" / "train.lmdb"), [(png(COLOURS[0]), 0), (b"not an image", 1), (png(COLOURS[1]), 47)])
    with pytest.raises(UserError, match="problems found"):
        run("--check", "dtd", "--out", out)
    err = capsys.readouterr().err
    assert "record b'00000001': image does not decode" in err
    assert "record b'00000002': label 47 outside 0..46" in err
    assert "train: counts differ from counts.json" in err


def test_check_reads_the_authors_tarball_without_counts_json(tmp_path, capsys):
    root = tmp_path / "data" / "aircraft"
    write_lmdb(str(root / "train.lmdb"), [(png(COLOURS[i % 3], width=5 + i), i % 3) for i in range(6)])
    write_lmdb(str(root / "test.lmdb"), [(png(COLOURS[0], width=4), 99), (png(COLOURS[1], width=4), 1)])
    counts = run("--check", "aircraft", "--out", tmp_path / "data")
    assert counts["train"]["total"] == 6 and counts["test"]["per_class"]["99"] == 1
    err = capsys.readouterr().err
    assert "warning: aircraft train: expected 6667 images (standard split), found 6" in err


def test_check_of_a_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        run("--check", "cub", "--out", tmp_path)


# ---------------------------------------------------------------- imagefolder without train/test

def flat_folder(root, sizes):
    for cls, n in sizes.items():
        for i in range(n):  # distinct sizes: distinct bytes, so records identify their files
            save_jpeg(os.path.join(root, cls, f"img{i:02d}.jpg"), COLOURS[len(cls) % 4], size=(8 + i, 8))
    return root


def read_records(path):
    reader = LMDBReader(str(path))
    return [reader[i] for i in range(len(reader))]


def test_imagefolder_seeded_split_is_deterministic_and_per_class(tmp_path):
    src = flat_folder(str(tmp_path / "src"), {"a": 10, "bb": 5})

    def build(out, seed):
        run("imagefolder", "--src", src, "--name", "mine", "--out", tmp_path / out, "--seed", seed)
        return {split: read_records(tmp_path / out / "mine" / f"{split}.lmdb") for split in ("train", "test")}

    first, again, other = build("one", 0), build("two", 0), build("three", 1)
    assert first == again
    assert first["test"] != other["test"]
    assert Counter(label for _, label in first["test"]) == {0: 2, 1: 1}  # round(0.2 * n) per class
    assert Counter(label for _, label in first["train"]) == {0: 8, 1: 4}
    train_and_test = [r for split in first.values() for r in split]
    assert len({image for image, _ in train_and_test}) == 15

    flat_folder(src, {"c": 4})  # a new class leaves the other classes' splits alone
    grown = build("four", 0)
    assert [r for r in grown["test"] if r[1] < 2] == first["test"]


def test_imagefolder_needs_a_name_and_both_splits_or_neither(tmp_path):
    src = flat_folder(str(tmp_path / "src"), {"a": 3})
    with pytest.raises(UserError, match="needs --name"):
        run("imagefolder", "--src", src, "--out", tmp_path / "data")
    os.makedirs(os.path.join(src, "train", "a"))
    with pytest.raises(UserError, match="has train/ but no test/"):
        run("imagefolder", "--src", src, "--out", tmp_path / "data", "--name", "mine")


# ---------------------------------------------------------------- an image in both splits, or listed twice

def copy_file(src, dst):
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data)


def repeat_an_image(dataset, src):
    """Damages the fake `src` so that it lists an image twice; returns the words the refusal must hold."""
    if dataset == "dtd":  # the case: the sizes match the standard split's, nothing else warns
        copy_file(os.path.join(src, "labels", "train1.txt"), os.path.join(src, "labels", "test1.txt"))
        return ["4 images are listed in both train and test", os.path.join(src, "labels", "train1.txt"),
                os.path.join(src, "labels", "test1.txt")]
    if dataset == "cub":  # a line of images.txt twice: both in the same split
        lines = open(os.path.join(src, "images.txt")).read().splitlines()
        write_text(os.path.join(src, "images.txt"), lines + [lines[2]])
        return ["0 images are listed in both train and test and 1 twice within a split",
                f"{os.path.join(src, 'images.txt')} (image id 3)", lines[2].split()[1]]
    if dataset == "aircraft":  # a test line copied into trainval
        data = os.path.join(src, "data")
        test_line = open(os.path.join(data, "images_variant_test.txt")).read().splitlines()[0]
        with open(os.path.join(data, "images_variant_trainval.txt"), "a") as f:
            f.write(test_line + "\n")
        return ["1 images are listed in both", os.path.join(data, "images_variant_trainval.txt"),
                os.path.join(data, "images_variant_test.txt"), f"{test_line.split()[0]}.jpg"]
    if dataset == "stanford_dogs":  # test_list.mat a copy of train_list.mat
        copy_file(os.path.join(src, "train_list.mat"), os.path.join(src, "test_list.mat"))
        return ["6 images are listed in both", os.path.join(src, "train_list.mat"), os.path.join(src, "test_list.mat")]
    if dataset == "vgg_flower_102":  # a training id among tstid
        ids = {"trnid": [3, 1, 5], "valid": [2, 9], "tstid": [4, 6, 7, 8, 10, 11, 9]}
        scipy.io.savemat(os.path.join(src, "setid.mat"), {k: np.array([v], dtype=np.float64) for k, v in ids.items()})
        return ["1 images are listed in both", "image_00009.jpg", f"{os.path.join(src, 'setid.mat')} (valid)",
                f"{os.path.join(src, 'setid.mat')} (tstid)"]
    if dataset == "chest_xray":  # a link in test/ to a training image: the same file
        train = os.path.join(src, "chest_xray", "train", "NORMAL", "IM-0000-0001.jpeg")
        link = os.path.join(src, "chest_xray", "test", "NORMAL", "IM-9999-0001.jpeg")
        os.symlink(train, link)
        return ["1 images are listed in both", f"{train} in", f"{link} in", "are the same file"]
    if dataset == "imagefolder":  # a second hard link, in test/, to a training image
        train, link = os.path.join(src, "train", "cat", "0.png"), os.path.join(src, "test", "cat", "9.png")
        os.link(train, link)
        return ["1 images are listed in both", train, link, "are the same file"]
    raise AssertionError(dataset)


@pytest.mark.parametrize("dataset", sorted(FAKES))
def test_converters_refuse_an_image_listed_twice_or_in_both_splits(tmp_path, dataset):
    src, *_ = FAKES[dataset](str(tmp_path / "src"))
    words = repeat_an_image(dataset, src)
    out = tmp_path / "data"
    with pytest.raises(UserError) as refused:
        run(dataset, "--src", src, "--out", out, "--name", "mine")
    for w in words + ["Each image must be listed once", "nothing was written"]:
        assert w in str(refused.value), (w, str(refused.value))
    assert not out.exists() or os.listdir(out) == []


def test_dtd_with_test1_a_copy_of_train1_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    from data import prepare
    from helpers import assert_one_line, tool_output

    src, *_ = fake_dtd(str(tmp_path / "src"))
    repeat_an_image("dtd", src)
    code, out, err = tool_output(prepare, ["dtd", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "train1.txt (train) and in", "test1.txt (test)", "inflates the accuracy")


# ---------------------------------------------------------------- --check: copies by content, image folders

def lmdb_pair(root, train, test):
    for split, records in (("train", train), ("test", test)):
        write_lmdb(str(root / f"{split}.lmdb"), records)


def test_check_finds_test_records_that_are_training_images(tmp_path, monkeypatch, capsys):
    """Whoever built the LMDBs (the authors' tarball, another tool): the same bytes in both splits are a leak."""
    from data import prepare
    from helpers import tool_output

    root = tmp_path / "data" / "mine"
    train = [(png(COLOURS[i % 2], width=3 + i), i % 2) for i in range(6)]
    lmdb_pair(root, train, [(png(COLOURS[0], width=20), 0), train[4], train[1]])
    code, _, err = tool_output(prepare, ["--check", "mine", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2, err
    leak = [line for line in err.splitlines() if "the test split holds training images" in line]
    assert len(leak) == 1, err
    assert ("2 test records are byte-for-byte copies of train records (test.lmdb record b'00000001' = train.lmdb "
            "record b'00000004'; test.lmdb record b'00000002' = train.lmdb record b'00000001')") in leak[0]
    assert err.strip().splitlines()[-1].startswith(f"error: {root}: 1 problems found")

    lmdb_pair(tmp_path / "data" / "clean", train, [(png(COLOURS[0], width=20), 0), (png(COLOURS[1], width=21), 1)])
    code, out, err = tool_output(prepare, ["--check", "clean", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 0 and "no test image is a training image" in out, err


def test_check_warns_of_copies_within_a_split(tmp_path, capsys):
    """They weigh an image twice but leak nothing (natural_crops makes them from small images): a warning."""
    root = tmp_path / "data" / "mine"
    train = [(png(COLOURS[i % 2], width=3 + i), i % 2) for i in range(4)]
    lmdb_pair(root, train + [train[0]], [(png(COLOURS[0], width=20), 0)])
    run("--check", "mine", "--out", tmp_path / "data")
    captured = capsys.readouterr()
    assert (f"warning: {root} train: 1 records are byte-for-byte copies of other train records (train.lmdb record "
            f"b'00000004' = train.lmdb record b'00000000')") in captured.err
    assert "ok, every record decodes" in captured.out


def test_check_of_an_image_folder_checks_its_images(tmp_path, monkeypatch, capsys):
    from data import prepare
    from helpers import tool_output

    src, classes, per_label, _ = fake_imagefolder(str(tmp_path / "data" / "mine"))
    code, out, err = tool_output(prepare, ["--check", "mine", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 0, err
    assert f"{src}: ok, every record decodes, labels in 0..1" in out
    assert "total       5       3" in out  # cat, dog of train/ and test/

    copy_file(os.path.join(src, "train", "dog", "1.png"), os.path.join(src, "test", "dog", "7.png"))
    with open(os.path.join(src, "test", "cat", "5.png"), "wb") as f:
        f.write(b"not an image")
    os.makedirs(os.path.join(src, "test", "bird"))
    code, out, err = tool_output(prepare, ["--check", "mine", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2 and f"{os.path.join(src, 'test')} has class folders that train/ lacks: bird" in err, err
    os.rmdir(os.path.join(src, "test", "bird"))
    code, out, err = tool_output(prepare, ["--check", "mine", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2, err
    assert "1 test records are byte-for-byte copies of train records (test/dog/7.png = train/dog/1.png)" in err
    assert f"{os.path.join(src, 'test', 'cat', '5.png')}: image does not decode" in err
    assert err.strip().splitlines()[-1] == f"error: {src}: 2 problems found; fix the folders and files named above"

    for name in os.listdir(os.path.join(src, "test", "dog")):  # test/ with a class folder but no image
        os.remove(os.path.join(src, "test", "dog", name))
    shutil.rmtree(os.path.join(src, "test", "cat"))
    code, out, err = tool_output(prepare, ["--check", "mine", "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2 and f"{src} test: no images (training refuses an empty split)" in err, err
