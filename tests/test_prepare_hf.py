"""data.prepare hf: a `datasets` source (save_to_disk, parquet, imagefolder, a Hub id) written in the project's own
form, read back through the training loader and --check; and its one-line refusals (a missing column or split, an
image in both splits, a Hub id that is not cached while offline, `datasets` not installed)."""
import io
import json
import os
import socket
import subprocess
import sys

import datasets  # requirements.txt installs it; the refusal without it is tested below
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from data import ImageDataset, LMDBReader
from data import prepare
from helpers import assert_one_line, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["dog", "cat", "eel"]  # the ClassLabel's order, not the sorted order other labels are numbered in
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]  # one per label
PER_LABEL = {"train": [2, 3, 1], "test": [1, 1, 2]}


def png(label: int, mark: int) -> bytes:
    """An 8x8 PNG of the label's colour with one pixel set to `mark`: each image distinct, its class visible. A text
    chunk makes the file differ from what re-encoding its pixels would give, so only the bytes as stored match."""
    img = Image.new("RGB", (8, 8), COLOURS[label])
    img.putpixel((0, 0), (mark, mark, mark))
    info = PngImagePlugin.PngInfo()
    info.add_text("mark", str(mark))
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def rows(split: str) -> list[tuple[bytes, int]]:
    """(PNG bytes, label) of a split, test's marks apart from train's."""
    start = 0 if split == "train" else 100
    labels = [label for label, n in enumerate(PER_LABEL[split]) for _ in range(n)]
    return [(png(label, start + i), label) for i, label in enumerate(labels)]


def dataset_dict(label_feature=None, image_column="image", label_column="label", leak=False):
    """A DatasetDict of train and test; labels as a ClassLabel of CLASSES, or as their names with `label_feature`
    Value('string'); with `leak`, test's first image is train's first."""
    label_feature = label_feature or datasets.ClassLabel(names=CLASSES)
    features = datasets.Features({image_column: datasets.Image(), label_column: label_feature})
    splits = {}
    for split in ("train", "test"):
        pairs = rows(split)
        if leak and split == "test":
            pairs[0] = rows("train")[0]
        labels = [label if isinstance(label_feature, datasets.ClassLabel) else CLASSES[label] for _, label in pairs]
        splits[split] = datasets.Dataset.from_dict(
            {image_column: [{"bytes": b, "path": None} for b, _ in pairs], label_column: labels}, features=features)
    return datasets.DatasetDict(splits)


def save_to_disk(root, **kwargs) -> str:
    path = os.path.join(root, "saved")
    dataset_dict(**kwargs).save_to_disk(path)
    return path


def parquet_folder(root, **kwargs) -> str:
    """Parquet files named as the Hub names them, so `datasets` reads the split from the file name."""
    path = os.path.join(root, "parquet")
    os.makedirs(path)
    for split, dataset in dataset_dict(**kwargs).items():
        dataset.to_parquet(os.path.join(path, f"{split}-00000-of-00001.parquet"))
    return path


def image_folder(root, **_) -> str:
    path = os.path.join(root, "images")
    for split in ("train", "test"):
        for i, (image, label) in enumerate(rows(split)):
            os.makedirs(os.path.join(path, split, CLASSES[label]), exist_ok=True)
            with open(os.path.join(path, split, CLASSES[label], f"{i:03d}.png"), "wb") as f:
                f.write(image)
    return path


def run(*argv):
    return prepare.main(prepare.get_args_parser().parse_args([str(a) for a in argv]))


def pixels(image_bytes: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(image_bytes)) as img:
        return np.asarray(img.convert("RGB"))


def assert_built(out, name, classes):
    """Counts, labels, class names and the stored bytes as the source holds them, read back as training reads them;
    --check passes."""
    counts = json.loads((out / name / "counts.json").read_text())
    assert counts["classes"] == classes and counts["num_classes"] == len(classes)
    for split in ("train", "test"):
        expected = {(image, classes.index(CLASSES[label])) for image, label in rows(split)}
        reader = LMDBReader(str(out / name / f"{split}.lmdb"))
        assert {reader[i] for i in range(len(reader))} == expected  # byte for byte, each with its label
        for image, label in expected:
            np.testing.assert_array_equal(pixels(image)[1:, 1:], np.full((7, 7, 3), COLOURS[CLASSES.index(
                classes[label])], np.uint8))
        loaded = ImageDataset(name, split, data_dir=str(out), image_size=8)
        assert len(loaded) == sum(PER_LABEL[split])
        assert sorted(int(loaded[i][1]) for i in range(len(loaded))) == sorted(label for _, label in expected)
        assert counts["splits"][split]["total"] == sum(PER_LABEL[split])
    assert run("--check", name, "--out", out)["test"]["total"] == sum(PER_LABEL["test"])


# ---------------------------------------------------------------- the three local forms

@pytest.mark.parametrize("make, classes", [(save_to_disk, CLASSES), (parquet_folder, CLASSES),
                                           (image_folder, sorted(CLASSES))])  # `datasets` sorts the class folders
def test_a_datasets_source_is_written_as_the_projects_own_dataset(tmp_path, capsys, make, classes):
    src = make(str(tmp_path))
    out = tmp_path / "data"
    run("hf", "--name", "pets", "--src", src, "--out", out, "--workers", 2)
    assert sorted(os.listdir(out)) == ["pets"]  # no hidden build or cache folder left behind
    assert sorted(os.listdir(out / "pets")) == ["counts.json", "test.lmdb", "train.lmdb"]
    assert_built(out, "pets", classes)
    assert "ok, every record decodes" in capsys.readouterr().out


def test_string_labels_are_numbered_in_sorted_order_over_both_splits(tmp_path):
    src = parquet_folder(str(tmp_path), label_feature=datasets.Value("string"), image_column="img",
                         label_column="species")
    out = tmp_path / "data"
    run("hf", "--name", "pets", "--src", src, "--out", out, "--image_column", "img", "--label_column", "species")
    assert_built(out, "pets", sorted(CLASSES))


def test_named_splits_become_train_and_test(tmp_path):
    src = os.path.join(tmp_path, "saved")
    dd = dataset_dict()
    datasets.DatasetDict({"fit": dd["train"], "holdout": dd["test"]}).save_to_disk(src)
    out = tmp_path / "data"
    run("hf", "--name", "pets", "--src", src, "--out", out, "--train_split", "fit", "--test_split", "holdout")
    assert_built(out, "pets", CLASSES)


def test_an_undecodable_image_stops_the_build_or_is_skipped_and_listed(tmp_path, monkeypatch, capsys):
    dd = dataset_dict()
    cells = list(dd["test"].cast_column("image", datasets.Image(decode=False))["image"])
    cells[2] = {"bytes": cells[2]["bytes"][:40], "path": None}  # a truncated PNG
    dd["test"] = datasets.Dataset.from_dict({"image": cells, "label": list(dd["test"]["label"])},
                                            features=dd["test"].features)
    src = os.path.join(tmp_path, "saved")
    dd.save_to_disk(src)
    out = tmp_path / "data"
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", src, "--out", out], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: cannot read image test row 2: UnidentifiedImageError")
    assert "--skip_bad" in err  # after the progress bars of the build
    assert os.listdir(out) == []
    counts = run("hf", "--name", "pets", "--src", src, "--out", out, "--skip_bad")
    assert counts["splits"]["test"]["skipped"] == ["test row 2"]
    assert counts["splits"]["test"]["total"] == sum(PER_LABEL["test"]) - 1


# ---------------------------------------------------------------- refusals: one line, nothing written

def test_a_missing_column_names_the_columns_there_are(tmp_path, monkeypatch, capsys):
    src = save_to_disk(str(tmp_path), label_column="fine_label")
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "no column 'label' (--label_column)", "its columns: image, fine_label")
    assert os.listdir(tmp_path / "data") == []


def test_a_missing_split_names_the_splits_there_are(tmp_path, monkeypatch, capsys):
    src = parquet_folder(str(tmp_path))
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", src, "--out", tmp_path / "data", "--test_split",
                              "validation"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "no split 'validation' (--test_split)", "its splits: train, test", "test-*.parquet")
    assert os.listdir(tmp_path / "data") == []


def test_an_image_in_both_splits_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    src = save_to_disk(str(tmp_path), leak=True)
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "1 test images are training images", "test row 0 = train row 0", "nothing was written")
    assert os.listdir(tmp_path / "data") == []


def test_unlabelled_images_are_refused(tmp_path, monkeypatch, capsys):
    dd = dataset_dict()
    dd["test"] = dd["test"].map(lambda row: {"label": -1})  # as a challenge's hidden test set has them
    src = os.path.join(tmp_path, "saved")
    dd.save_to_disk(src)
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "test: 4 images have label -1, outside 0..2", "unlabelled")
    assert os.listdir(tmp_path / "data") == []


def test_the_same_image_twice_within_a_split_is_a_warning(tmp_path, capsys):
    dd = dataset_dict()
    dd["train"] = datasets.concatenate_datasets([dd["train"], dd["train"].select([1])])
    src = os.path.join(tmp_path, "saved")
    dd.save_to_disk(src)
    counts = run("hf", "--name", "pets", "--src", src, "--out", tmp_path / "data")
    assert counts["splits"]["train"]["total"] == sum(PER_LABEL["train"]) + 1
    assert "1 images repeat an image of their own split byte for byte (e.g. train row 6 = train row 1)" \
        in capsys.readouterr().err


def test_an_uncached_hub_id_offline_is_one_line(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: set as the variable would
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", "nobody-here/no-such-set", "--out",
                              tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "'nobody-here/no-such-set' is neither a local folder nor a Hub dataset in the local Hugging "
                         "Face cache", "offline",
                    "save_to_disk", "--src DIR")


def test_an_unreachable_hub_reads_the_cache_alone_at_once(tmp_path, monkeypatch, capsys):
    """An unreachable Hub is retried for minutes by huggingface_hub: it is found once, up front, as for models."""
    import huggingface_hub.constants
    import models.hub
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models.hub, "_hub_offline_reason", lambda: "the Hub (example.invalid:443) cannot be reached")
    looked_up = []

    def getaddrinfo(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    code, err = cli(prepare, ["hf", "--name", "pets", "--src", "nobody-here/no-such-set", "--out",
                              tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "nor a Hub dataset in the local Hugging Face cache", "example.invalid:443) cannot be reached")
    assert looked_up == []  # the cache alone was read


def test_without_the_datasets_package_it_says_what_to_install(tmp_path):
    src = image_folder(str(tmp_path))
    hide = ("import runpy, sys; sys.modules['datasets'] = None; sys.argv = ['prepare', *sys.argv[1:]]; "
            "runpy.run_module('data.prepare', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", hide, "hf", "--name", "pets", "--src", src, "--out",
                             str(tmp_path / "data")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: python -m data.prepare hf needs the `datasets` package: pip install datasets"]
    assert not (tmp_path / "data").exists()
