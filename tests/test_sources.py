"""data/sources.py through `python -m data.prepare`: natural_crops from a folder of images and from (fake) Debian
packages, fashion_mnist from tiny idx files; what is dropped and why, the crops, the seeded choices, counts.json,
and the one-line errors for a missing tool, a failed download or a missing path. No network: `apt-get` and
`dpkg-deb` are small fakes on PATH that serve packages made from folders here."""
import io
import json
import os
import stat
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

from data import ImageDataset, LMDBReader
from data import sources
from data.prepare import get_args_parser, main
from errors import UserError

from helpers import REPO, fake_fashion, idx_file, save_image, striped


PALETTE = [(200, 50, 50), (50, 200, 50), (50, 50, 200), (200, 200, 50), (200, 50, 200), (50, 200, 200),
           (130, 130, 130), (230, 140, 40), (90, 40, 160)]  # one per kept image: a crop's mean names its image
LEAK = (10, 10, 10)  # the colour of images that must be dropped: a crop near it is a leak


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def encoded(array, fmt):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def image_tree(root):
    """A folder as packages ship them: 9 usable images (two inside a .pk3), and one of each kind to drop.
    Returns the expected drop counts."""
    sizes = [(64, 48), (80, 80), (96, 64), (48, 72), (64, 64), (56, 90)]
    for i, (colour, size) in enumerate(zip(PALETTE[:6], sizes)):
        save_image(os.path.join(root, "usr", "share", f"img{i}.png"), striped(colour, size, angle=0.4 * i, seed=i))
    half_flat = striped(PALETTE[6], (200, 48), angle=2.2)
    half_flat[:, 100:] = PALETTE[6]  # about 40 % of its crops would be flat: they are drawn again
    save_image(os.path.join(root, "usr", "share", "img6.png"), half_flat)
    with zipfile.ZipFile(os.path.join(root, "usr", "share", "textures.pk3"), "w") as pk3:
        pk3.writestr("textures/a.tga", encoded(striped(PALETTE[7], (64, 64), angle=3.0), "TGA"))
        pk3.writestr("textures/b.png", encoded(striped(PALETTE[8], (72, 64), angle=2.5), "PNG"))
        pk3.writestr("textures/a_gloss.tga", encoded(striped(LEAK, (64, 64), angle=1.0), "TGA"))  # material map
        pk3.writestr("readme.txt", "not an image")
    share = os.path.join(root, "usr", "share")
    save_image(os.path.join(share, "walls", "brick_norm.png"), striped(LEAK, (64, 64), angle=1.3))  # material map
    save_image(os.path.join(share, "copy", "img0.bmp"), np.asarray(Image.open(os.path.join(share, "img0.png"))),
         "BMP")  # the same pixels in another file: a duplicate
    save_image(os.path.join(share, "flat.png"), striped(LEAK, (64, 64), angle=0, amplitude=1.0))  # near-flat
    save_image(os.path.join(share, "tiny.png"), striped(LEAK, (20, 20), angle=2.0))  # shorter side < 32
    with open(os.path.join(share, "broken.jpg"), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 not really a JPEG")
    os.symlink("img1.png", os.path.join(share, "link.png"))  # not a second image
    return {"material map": 2, "duplicate": 1, "near-flat": 1, "too small": 1, "unreadable": 1}


def crops_of(path):
    reader = LMDBReader(str(path))
    return [reader[i] for i in range(len(reader))]


def source_image(image_bytes):
    """The PALETTE index of the image a crop came from, by its mean colour."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
        pixels = np.asarray(img, dtype=np.float64)
    assert pixels.reshape(-1, 3).std(0).max() >= sources.FLAT_STD
    distances = np.abs(np.array(PALETTE + [LEAK]) - pixels.mean((0, 1))).max(1)
    assert distances.min() < 20 and np.argmin(distances) < len(PALETTE), pixels.mean((0, 1))
    return int(np.argmin(distances))


# ---------------------------------------------------------------- natural_crops from a folder

@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("natural")
    drops = image_tree(str(root / "images"))
    run("natural_crops", "--src", root / "images", "--out", root / "data", "--crops", 60, "--heldout_fraction", 0.2,
        "--workers", 1)
    return root, drops


def test_natural_crops_drops_what_is_no_picture_and_keeps_the_rest(folder_build):
    root, drops = folder_build
    counts = json.loads((root / "data" / "natural_crops" / "counts.json").read_text())
    images = counts["images"]
    assert images["dropped"] == drops and images["kept"] == len(PALETTE)
    assert images["candidates"] == len(PALETTE) + sum(drops.values())  # the symbolic link is not one
    assert images["unreadable"] == [os.path.join("images", "usr", "share", "broken.jpg")]
    assert (images["train"], images["test"]) == (7, 2)  # round(0.2 * 9) images held out
    assert counts["classes"] == ["natural"] and counts["src"] == str(root / "images") and counts["packages"] is None
    assert counts["splits"]["train"]["total"] == 60 and counts["crops_wanted"] == {"train": 60, "test": 17}


def test_natural_crops_every_image_gets_its_share_and_held_out_images_only_test(folder_build):
    root, _ = folder_build
    train = [source_image(image) for image, label in crops_of(root / "data" / "natural_crops" / "train.lmdb")]
    test = [source_image(image) for image, label in crops_of(root / "data" / "natural_crops" / "test.lmdb")]
    assert len(train) == 60 and len(test) == 17
    per_image = np.bincount(train, minlength=len(PALETTE))
    assert sorted(per_image[per_image > 0].tolist()) == [8, 8, 8, 9, 9, 9, 9]  # 60 over 7 images, at most one apart
    assert not set(test) & set(train) and len(set(test)) == 2  # held-out images give test crops only
    assert sorted(np.bincount(test)[sorted(set(test))].tolist()) == [8, 9]  # 17 over 2: as many as train has
    assert {label for _, label in crops_of(root / "data" / "natural_crops" / "train.lmdb")} == {0}
    dataset = ImageDataset("natural_crops", "train", str(root / "data"), image_size=32)
    assert dataset.num_classes() == 1 and dataset[0][0].shape == (3, 32, 32)


def test_natural_crops_are_seeded_and_independent_of_workers(folder_build, tmp_path):
    root, _ = folder_build
    common = ["--src", root / "images", "--crops", 60, "--heldout_fraction", 0.2]
    run("natural_crops", *common, "--out", tmp_path / "again", "--workers", 3)
    run("natural_crops", *common, "--out", tmp_path / "other", "--seed", 1)
    first = crops_of(root / "data" / "natural_crops" / "train.lmdb")
    assert crops_of(tmp_path / "again" / "natural_crops" / "train.lmdb") == first
    assert crops_of(tmp_path / "other" / "natural_crops" / "train.lmdb") != first


def test_an_images_crops_depend_on_the_seed_and_its_name_only(folder_build):
    root, _ = folder_build
    path = str(root / "images" / "usr" / "share" / "img1.png")
    image = sources.Candidate("images/usr/share/img1.png", path, None, "images")
    five, _ = sources._crops(image, 5, 32, 0.1, seed=0)
    assert sources._crops(image, 3, 32, 0.1, seed=0)[0] == five[:3]  # not on how many it gives
    assert sources._crops(image._replace(source="elsewhere"), 5, 32, 0.1, seed=0)[0] == five
    assert sources._crops(image, 5, 32, 0.1, seed=1)[0] != five
    assert sources._crops(image._replace(name="images/other.png"), 5, 32, 0.1, seed=0)[0] != five


def test_images_above_max_pixels_are_dropped_before_decoding(folder_build, tmp_path, monkeypatch):
    root, drops = folder_build
    monkeypatch.setattr(sources, "MAX_PIXELS", 5000)  # img1 (80x80), img2 (96x64), img5 and img6 are larger
    run("natural_crops", "--src", root / "images", "--out", tmp_path, "--crops", 20, "--heldout_fraction", 0.2)
    dropped = json.loads((tmp_path / "natural_crops" / "counts.json").read_text())["images"]["dropped"]
    assert dropped == {**drops, "too large": 4}


def test_transparent_pixels_are_put_on_white():
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)  # transparent black ...
    rgba[:, :20] = (200, 30, 30, 255)  # ... beside an opaque red half
    img = sources._rgb(encoded(rgba, "PNG"))
    assert img.mode == "RGB" and img.getpixel((30, 5)) == (255, 255, 255) and img.getpixel((5, 5)) == (200, 30, 30)


def test_natural_crops_refusals(tmp_path, folder_build):
    root, _ = folder_build
    with pytest.raises(UserError, match="is not a folder"):
        run("natural_crops", "--src", tmp_path / "nowhere", "--out", tmp_path / "data")
    empty = tmp_path / "empty"
    save_image(str(empty / "only.png"), striped(PALETTE[0], (64, 64), angle=0))
    with pytest.raises(UserError, match="1 usable images of 1 found"):
        run("natural_crops", "--src", empty, "--out", tmp_path / "data")
    with pytest.raises(UserError, match="--packages names Debian packages"):
        run("natural_crops", "--src", root / "images", "--packages", "x", "--out", tmp_path / "data")
    with pytest.raises(UserError, match="--resize and --skip_bad do not apply"):
        run("natural_crops", "--src", root / "images", "--resize", 64, "--out", tmp_path / "data")
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        run("natural_crops", "--src", root / "images", "--out", root / "data")
    assert not (tmp_path / "data").exists()  # refused before anything was written


# ---------------------------------------------------------------- fake Debian tools

FAKE_APT = r'''
import os, sys, tarfile
registry = os.environ["FAKE_DEBIAN"]
with open(os.path.join(registry, "calls.log"), "a") as log:
    log.write("apt-get " + " ".join(sys.argv[1:]) + "\n")
if os.environ.get("FAKE_APT_OFFLINE"):
    sys.exit("E: Failed to fetch http://deb.example/pool/x.deb  Temporary failure resolving 'deb.example'")
args = sys.argv[1:]
assert args[0] == "download", args
print_uris = "--print-uris" in args
for package in [a for a in args[1:] if not a.startswith("-")]:
    folder = os.path.join(registry, package)
    if not os.path.isdir(folder):
        sys.exit(f"E: Unable to locate package {package}")
    version = open(os.path.join(folder, "version")).read().strip()
    deb = f"{package}_{version.replace(':', '%3a')}_all.deb"
    if os.path.exists(deb):
        continue  # as apt: a file already there is neither listed nor fetched again
    if print_uris:
        print(f"'http://deb.example/pool/{deb}' {deb} 1234 SHA256:0")
        continue
    with tarfile.open(deb, "w") as tar:
        tar.add(os.path.join(folder, "tree"), arcname=".")
        tar.add(os.path.join(folder, "version"), arcname="DEBIAN/version")
'''

FAKE_DPKG_DEB = r'''
import os, sys, tarfile
registry = os.environ["FAKE_DEBIAN"]
with open(os.path.join(registry, "calls.log"), "a") as log:
    log.write("dpkg-deb " + " ".join(sys.argv[1:]) + "\n")
args = sys.argv[1:]
with tarfile.open(args[1]) as tar:
    if args[0] == "--field":
        version = tar.extractfile("DEBIAN/version").read().decode().strip()
        print(f"Package: {os.path.basename(args[1]).split('_')[0]}")
        print(f"Version: {version}")
    elif args[0] == "-x":
        tar.extractall(args[2], members=[m for m in tar.getmembers() if "DEBIAN" not in m.name], filter="data")
    else:
        sys.exit(f"unknown option {args[0]}")
'''


@pytest.fixture
def fake_debian(tmp_path, monkeypatch):
    """A package registry (tmp/registry/<package>/{version, tree/}) served by fake apt-get and dpkg-deb that lead
    PATH; returns (registry, add(package, version) -> its tree folder, calls() -> logged command lines)."""
    registry, bin_dir = tmp_path / "registry", tmp_path / "bin"
    registry.mkdir()
    bin_dir.mkdir()
    for tool, code in (("apt-get", FAKE_APT), ("dpkg-deb", FAKE_DPKG_DEB)):
        path = bin_dir / tool
        path.write_text(f"#!{sys.executable}\n{code}")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DEBIAN", str(registry))

    def add(package, version):
        (registry / package / "tree").mkdir(parents=True)
        (registry / package / "version").write_text(version)
        return registry / package / "tree"

    def calls():
        log = registry / "calls.log"
        return log.read_text().splitlines() if log.exists() else []
    return registry, add, calls


def test_natural_crops_from_debian_packages(fake_debian, tmp_path):
    registry, add, calls = fake_debian
    image_tree(str(add("texture-pack", "1:2.5-1")))
    other = add("wallpapers", "43.1-1")
    save_image(str(other / "usr" / "share" / "backgrounds" / "sky.jpg"), striped((120, 160, 220), (96, 64), angle=1.9),
         "JPEG")
    out, downloads = tmp_path / "data", tmp_path / "downloads"
    argv = ["natural_crops", "--packages", "texture-pack", "wallpapers", "--out", out, "--download_dir", downloads,
            "--crops", 40, "--heldout_fraction", 0.1]
    run(*argv)
    counts = json.loads((out / "natural_crops" / "counts.json").read_text())
    assert counts["packages"] == [
        {"package": "texture-pack", "version": "1:2.5-1", "deb": "texture-pack_1%3a2.5-1_all.deb"},
        {"package": "wallpapers", "version": "43.1-1", "deb": "wallpapers_43.1-1_all.deb"}]
    assert counts["images_per_source"] == {"texture-pack": {"candidates": 15, "material maps": 2, "kept": 9},
                                           "wallpapers": {"candidates": 1, "material maps": 0, "kept": 1}}
    assert counts["src"] is None and counts["splits"]["train"]["total"] == 40
    assert sorted(os.listdir(downloads)) == ["texture-pack_1%3a2.5-1_all", "texture-pack_1%3a2.5-1_all.deb",
                                             "wallpapers_43.1-1_all", "wallpapers_43.1-1_all.deb"]
    first = crops_of(out / "natural_crops" / "train.lmdb")

    # again: nothing downloaded or unpacked twice, the same crops
    debs = {deb: os.stat(downloads / deb).st_mtime_ns for deb in os.listdir(downloads) if deb.endswith(".deb")}
    before = len(calls())
    run(*argv, "--overwrite")
    assert [line for line in calls()[before:] if " -x " in line] == []
    assert {deb: os.stat(downloads / deb).st_mtime_ns for deb in debs} == debs
    assert crops_of(out / "natural_crops" / "train.lmdb") == first


def test_missing_tools_name_what_to_install_or_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # neither apt-get nor dpkg-deb
    for name in ("natural_crops", "fashion_mnist"):
        with pytest.raises(UserError, match=r"with apt-get and dpkg-deb, and apt-get and dpkg-deb are not on PATH "
                                            r"\(install apt and dpkg.*or pass --src DIR"):
            run(name, "--out", tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_unknown_package_asks_for_apt_get_update(fake_debian, tmp_path):
    with pytest.raises(UserError, match=r"Unable to locate package no-such-package \(refresh the package lists "
                                        r"with `apt-get update`\); or pass --src DIR"):
        run("natural_crops", "--packages", "no-such-package", "--out", tmp_path / "data")


def test_failed_download_is_one_line_exit_2(fake_debian, tmp_path):
    _, add, _ = fake_debian
    add("texture-pack", "1.0")
    env = {**os.environ, "FAKE_APT_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "data.prepare", "natural_crops", "--packages", "texture-pack",
                             "--out", str(tmp_path / "data")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: `apt-get download --print-uris ...` failed: E: Failed "
                                                   "to fetch"), result.stderr
    assert "(no network, or no access to the Debian archive?); or pass --src DIR" in lines[0]
    assert not os.path.exists(tmp_path / "data" / "natural_crops")


# ---------------------------------------------------------------- fashion_mnist

def pixels(record):
    with Image.open(io.BytesIO(record[0])) as img:
        assert img.format == "PNG" and img.mode == "L"
        return np.asarray(img), record[1]


def test_fashion_mnist_shots_per_class_and_the_whole_test_split(tmp_path):
    arrays = fake_fashion(str(tmp_path / "src"))
    run("fashion_mnist", "--src", tmp_path / "src", "--out", tmp_path / "data", "--shots", 2)
    root = tmp_path / "data" / "fashion_mnist"
    counts = json.loads((root / "counts.json").read_text())
    assert list(counts) == ["name", "dataset", "src", "resize", "num_classes", "classes", "splits", "expected",
                            "shots", "seed", "train_indices", "packages"]
    assert counts["classes"] == sources.FASHION_MNIST_CLASSES and counts["num_classes"] == 10
    assert counts["shots"] == 2 and counts["seed"] == 0 and counts["packages"] is None
    chosen = counts["train_indices"]
    train = [pixels(r) for r in crops_of(root / "train.lmdb")]
    assert [label for _, label in train] == [int(arrays["train"][1][i]) for i in chosen]
    assert sorted(label for _, label in train) == sorted(list(range(10)) * 2)
    for (image, _), i in zip(train, chosen):
        np.testing.assert_array_equal(image, arrays["train"][0][i])  # 7 rows x 5 columns, byte for byte
    test = [pixels(r) for r in crops_of(root / "test.lmdb")]
    assert [label for _, label in test] == arrays["test"][1].tolist()
    for (image, _), expected in zip(test, arrays["test"][0]):
        np.testing.assert_array_equal(image, expected)
    assert ImageDataset("fashion_mnist", "train", str(tmp_path / "data"), image_size=32).num_classes() == 10

    run("fashion_mnist", "--src", tmp_path / "src", "--out", tmp_path / "same", "--shots", 2)
    run("fashion_mnist", "--src", tmp_path / "src", "--out", tmp_path / "other", "--shots", 2, "--seed", 1)
    assert json.loads((tmp_path / "same" / "fashion_mnist" / "counts.json").read_text())["train_indices"] == chosen
    assert json.loads((tmp_path / "other" / "fashion_mnist" / "counts.json").read_text())["train_indices"] != chosen

    run("fashion_mnist", "--src", tmp_path / "src", "--out", tmp_path / "all")
    assert len(LMDBReader(str(tmp_path / "all" / "fashion_mnist" / "train.lmdb"))) == 40  # no --shots: all of it


def test_fashion_mnist_from_the_debian_package(fake_debian, tmp_path):
    _, add, _ = fake_debian
    fake_fashion(str(add("dataset-fashion-mnist", "0.0~git20200523.55506a9-1") / sources.FASHION_MNIST_PACKAGE_DIR))
    run("fashion_mnist", "--out", tmp_path / "data", "--shots", 3, "--name", "fashion_3")
    counts = json.loads((tmp_path / "data" / "fashion_3" / "counts.json").read_text())
    assert counts["packages"] == [{"package": "dataset-fashion-mnist", "version": "0.0~git20200523.55506a9-1",
                                   "deb": "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"}]
    assert counts["splits"]["train"]["total"] == 30 and counts["splits"]["test"]["total"] == 15
    assert os.path.isdir(tmp_path / "data" / ".downloads" / "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all")


@pytest.mark.parametrize("damage, message", [
    ("missing", r"missing .*t10k-labels-idx1-ubyte\[\.gz\] \(expected Fashion-MNIST's idx files"),
    ("truncated", r"t10k-images-idx3-ubyte: the header says 15x7x5 bytes of data, the file holds 100"),
    ("not idx", r"t10k-images-idx3-ubyte is not an idx file"),
    ("shots", r"--shots 5: class \d \(.*\) has only 4 training images"),
    ("copied", r"t10k-images-idx3-ubyte: 20 test images are training images and 0 repeat within a split, pixel for "
               r"pixel \(e\.g\. test image (\d+) = train image \1, counted from 0\).*inflates the accuracy.*t10k-\* "),
    ("repeated", r"0 test images are training images and 1 repeat within a split, pixel for pixel \(e\.g\. test image "
                 r"14 = test image 3")])
def test_fashion_mnist_bad_input_is_named(tmp_path, damage, message):
    src = tmp_path / "src"
    arrays = fake_fashion(str(src))
    if damage == "missing":
        os.remove(src / "t10k-labels-idx1-ubyte")
    elif damage == "truncated":
        data = (src / "t10k-images-idx3-ubyte").read_bytes()
        (src / "t10k-images-idx3-ubyte").write_bytes(data[:16 + 100])
    elif damage == "not idx":
        (src / "t10k-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip file")
    elif damage == "copied":  # the t10k files copies of the training files: the 20 chosen are test images too
        for stem, array in zip(sources.FASHION_MNIST_FILES["test"], arrays["train"]):
            (src / stem).write_bytes(idx_file(array, gz=False))
    elif damage == "repeated":  # the last test image repeats the fourth
        images = arrays["test"][0]
        (src / "t10k-images-idx3-ubyte").write_bytes(idx_file(np.concatenate([images[:14], images[3:4]]), gz=False))
    with pytest.raises(UserError, match=message):
        run("fashion_mnist", "--src", src, "--out", tmp_path / "data", "--shots", 5 if damage == "shots" else 2)
    assert not (tmp_path / "data").exists() or os.listdir(tmp_path / "data") == []
