"""Build data/<name>/{train,test}.lmdb (the release's format, README "Data") from a dataset as its owners publish it.

    python -m data.prepare cub --src ~/downloads/CUB_200_2011 --out data
    python -m data.prepare imagefolder --src ~/my_xrays --name my_xrays --resize 256
    python -m data.prepare --check cub --out data

Converters and the splits they write (train / test, the usual benchmark splits):
    aircraft        FGVC-Aircraft, variant level (100 classes): trainval (6,667) / test (3,333);
                    data/variants.txt order; --src is fgvc-aircraft-2013b/ (or its data/)
    cub             CUB-200-2011: train_test_split.txt (5,994 / 5,794); classes.txt order
    dtd             DTD split 1: train1 + val1 (3,760) / test1 (1,880); class names sorted
    stanford_dogs   Stanford Dogs: train_list.mat (12,000) / test_list.mat (8,580); label numbers;
                    --src holds the .mat files (lists.tar) and Images/ (images.tar)
    vgg_flower_102  Oxford Flowers-102: trnid + valid (2,040) / tstid (6,149) of setid.mat;
                    label numbers of imagelabels.mat; images in jpg/
    chest_xray      Kermany et al. (Kaggle "chest-xray-pneumonia"): train/ (5,216) / test/ (624);
                    NORMAL = 0, PNEUMONIA = 1; val/ (16 images) is not used (Mendeley's original
                    has no val/ and 5,232 train images: expect a count warning with it)
    imagefolder     your own <src>/<class>/<image> (or <src>/{train,test}/<class>/<image>); class
                    folders sorted; without train/ and test/, each class is split with --seed,
                    --test_fraction of its images going to test. Needs --name.
    natural_crops   random square crops of natural-ish images (the small reproduction's source domain):
                    from Debian packages (apt-get download), or from any folder with --src
    fashion_mnist   Fashion-MNIST from its idx files (Debian's dataset-fashion-mnist, or --src DIR);
                    --shots N training images per class, all 10,000 test images
                    (these two: data/sources.py, which lists their options)
The train split of each benchmark includes its validation part: the recipe has no validation.

Images are stored byte-for-byte by default. `--resize N` instead stores JPEG (quality 95) shrunk
so that the shorter side is N (aspect ratio kept, never enlarged): a smaller, faster LMDB that is
still a faithful picture; training resizes to 224x224 anyway, so N >= 224 loses nothing there.

An image listed twice, within a split or in both (the same file: a link or a second hard link counts), is
refused before anything is written, naming the index files: a test split holding training images would inflate
every accuracy, and its size may still match the standard split's.

Every image is decoded once while building (16-bit grayscale scaled to 8 bits by v / 257, as training
does; the original bytes are stored unless --resize). An unreadable one stops the build (naming it) unless
--skip_bad, which skips and lists it. Both splits are written into a hidden folder
`<out>/.<name>.partial-*` and moved to `<out>/<name>` only once both are complete; an existing
`<out>/<name>` is replaced (after that) only with --overwrite, which moves it to `<out>/<name>.old-<date>-<time>`
(nothing is deleted).

After building, the images per split and per class are printed and stored in
`<out>/<name>/counts.json`; a split whose size differs from the standard split prints a
`warning: <name> <split>: expected ... images (standard split), found ...` line on stderr and
does not fail (fake or partial sources are legitimate). `--check NAME` decodes every record of an
existing `<out>/<name>` (ours, the authors' data.tar.gz, or an image folder <name>/{train,test}/<class>/<image>)
and checks labels and counts, and that no test record is a byte-for-byte copy of a train record (the SHA-256 of
each encoded image, taken in the same pass; copies within one split are a warning: they weigh an image twice but
leak nothing), whoever built the splits.
"""
import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import random
import shutil
import sys
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import lmdb
import numpy as np
import scipy.io
from PIL import Image
from tqdm import tqdm

from data import sources
from data.datasets import (DATASETS, SPLITS, check_name, class_folders, file_kind, folder_split, how_to_rebuild,
                           image_files, read_counts, split_reader, to_8bit, unusable_file)
import outputs
from data.lmdb_format import LMDBReader, write_lmdb
from errors import UserError

# Sizes of the standard splits (train includes validation where the dataset has one).
EXPECTED_COUNTS = {
    "aircraft": {"train": 6667, "test": 3333},
    "cub": {"train": 5994, "test": 5794},
    "dtd": {"train": 3760, "test": 1880},
    "stanford_dogs": {"train": 12000, "test": 8580},
    "vgg_flower_102": {"train": 2040, "test": 6149},
    "chest_xray": {"train": 5216, "test": 624},
}
JPEG_QUALITY = 95
MAX_LISTED_PROBLEMS = 20
MAX_LISTED_COPIES = 3  # examples in --check's line about records that are copies of others
SPACE_MARGIN = 64 << 20  # bytes a build leaves free beyond the images' size (LMDB pages, counts.json)


class Source(NamedTuple):
    splits: dict  # split -> list of (image path, 0-based label)
    classes: list  # label -> class name
    listed_in: dict  # split -> where each of its images is listed (an index file, a folder), in the same order


# ---------------------------------------------------------------- reading the published layouts

def _locate(src: str, marker: str, subdirs) -> str:
    """The folder under `src` (one of `subdirs`) holding `marker`, so that --src may point at the
    extracted archive or at the folder inside it; the first candidate when none has it."""
    for sub in subdirs:
        if os.path.exists(os.path.join(src, sub, marker)):
            return os.path.normpath(os.path.join(src, sub))
    return os.path.normpath(os.path.join(src, subdirs[0]))


def _require(path: str, layout: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"missing {path} (expected {layout})")
    return path


def _regular(path: str) -> str:
    """`path`, if a regular file: opening a FIFO (or a device) there would wait for ever."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise UserError(f"cannot read {path}: {file_kind(os.stat(path).st_mode)}, not a regular file")
    return path


def _read_lines(path: str) -> list[str]:
    _regular(path)
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _pairs(path: str) -> list[tuple[str, str]]:
    """'<id> <value with spaces>' lines."""
    pairs = []
    for number, line in enumerate(_read_lines(path), 1):
        fields = line.split(maxsplit=1)
        if len(fields) != 2:
            raise UserError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def _loadmat(path: str, keys) -> dict:
    _regular(path)
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # corrupt file, MATLAB v7.3 (HDF5), ...
        raise UserError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    for key in keys:
        if key not in mat:
            found = ", ".join(k for k in mat if not k.startswith("__"))
            raise UserError(f"{path} has no variable '{key}' (found: {found})")
    return mat


def _mat_ints(path: str, values) -> list[int]:
    try:
        values = np.atleast_1d(np.asarray(values, dtype=np.float64)).ravel()
    except (TypeError, ValueError):
        raise UserError(f"{path}: expected numeric labels or ids") from None
    if not np.all(values == np.round(values)):
        raise UserError(f"{path}: expected integer labels or ids")
    return [int(v) for v in values]


def _mat_strings(values) -> list[str]:
    return [str(np.asarray(v).squeeze()) for v in np.atleast_1d(values).ravel()]


# ---------------------------------------------------------------- one converter per dataset

def aircraft(src: str) -> Source:
    layout = "FGVC-Aircraft: data/variants.txt, data/images_variant_{trainval,test}.txt, data/images/"
    root = _locate(src, "variants.txt", ["data", "fgvc-aircraft-2013b/data", "."])
    classes = _read_lines(_require(os.path.join(root, "variants.txt"), layout))
    label_of = {name: label for label, name in enumerate(classes)}
    image_dir = _require(os.path.join(root, "images"), layout)
    splits, listed_in = {}, {}
    for split, index in (("train", "images_variant_trainval.txt"), ("test", "images_variant_test.txt")):
        path = _require(os.path.join(root, index), layout)
        items = []
        for image_id, variant in _pairs(path):
            if variant not in label_of:
                raise UserError(f"{path}: variant {variant!r} of image {image_id} is not in variants.txt")
            items.append((os.path.join(image_dir, f"{image_id}.jpg"), label_of[variant]))
        splits[split] = items
        listed_in[split] = [path] * len(items)
    return Source(splits, classes, listed_in)


def cub(src: str) -> Source:
    layout = "CUB-200-2011: images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/"
    root = _locate(src, "images.txt", [".", "CUB_200_2011"])
    index = {name: _pairs(_require(os.path.join(root, name), layout))
             for name in ("classes.txt", "images.txt", "image_class_labels.txt", "train_test_split.txt")}
    image_dir = _require(os.path.join(root, "images"), layout)
    label_of = {class_id: label for label, (class_id, _) in enumerate(index["classes.txt"])}
    classes = [name for _, name in index["classes.txt"]]
    class_of, is_train = dict(index["image_class_labels.txt"]), dict(index["train_test_split.txt"])
    splits, listed_in = {"train": [], "test": []}, {"train": [], "test": []}
    for image_id, relpath in index["images.txt"]:
        for table, name in ((class_of, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise UserError(f"{os.path.join(root, name)} has no line for image {image_id}")
        if class_of[image_id] not in label_of:
            raise UserError(f"class {class_of[image_id]} of image {image_id} is not in classes.txt")
        split = "train" if is_train[image_id] == "1" else "test"
        splits[split].append((os.path.join(image_dir, relpath), label_of[class_of[image_id]]))
        listed_in[split].append(f"{os.path.join(root, 'images.txt')} (image id {image_id})")
    return Source(splits, classes, listed_in)


def dtd(src: str) -> Source:
    layout = "DTD: labels/train1.txt, labels/val1.txt, labels/test1.txt, images/<class>/"
    root = _locate(src, os.path.join("labels", "train1.txt"), [".", "dtd"])
    lists = {name: _read_lines(_require(os.path.join(root, "labels", name), layout))
             for name in ("train1.txt", "val1.txt", "test1.txt")}
    image_dir = _require(os.path.join(root, "images"), layout)
    for name, lines in lists.items():
        for line in lines:
            if "/" not in line:
                raise UserError(f"{os.path.join(root, 'labels', name)}: expected '<class>/<image>', got {line!r}")
    classes = sorted({line.split("/")[0] for lines in lists.values() for line in lines})
    label_of = {name: label for label, name in enumerate(classes)}

    parts = {"train": ("train1.txt", "val1.txt"), "test": ("test1.txt",)}
    splits = {split: [(os.path.join(image_dir, line), label_of[line.split("/")[0]])
                      for name in names for line in lists[name]] for split, names in parts.items()}
    listed_in = {split: [os.path.join(root, "labels", name) for name in names for _ in lists[name]]
                 for split, names in parts.items()}
    return Source(splits, classes, listed_in)


def stanford_dogs(src: str) -> Source:
    layout = "Stanford Dogs: train_list.mat, test_list.mat (lists.tar), Images/ (images.tar)"
    image_dir = _require(os.path.join(src, "Images"), layout)
    splits, names, listed_in = {}, {}, {}
    for split in SPLITS:
        path = _require(os.path.join(src, f"{split}_list.mat"), layout)
        mat = _loadmat(path, ("file_list", "labels"))
        files, numbers = _mat_strings(mat["file_list"]), _mat_ints(path, mat["labels"])
        if len(files) != len(numbers) or min(numbers, default=1) < 1:
            raise UserError(f"{path}: file_list and 1-based labels do not match")
        for file, number in zip(files, numbers):
            folder = file.split("/")[0]  # 'n02085620-Chihuahua'
            if names.setdefault(number, folder) != folder:
                raise UserError(f"{path}: label {number} is both {names[number]} and {folder}")
        splits[split] = [(os.path.join(image_dir, f), n - 1) for f, n in zip(files, numbers)]
        listed_in[split] = [path] * len(files)
    classes = [names.get(number, str(number)) for number in range(1, max(names, default=0) + 1)]
    return Source(splits, classes, listed_in)


def vgg_flower_102(src: str) -> Source:
    layout = "Oxford Flowers-102: imagelabels.mat, setid.mat, jpg/image_00001.jpg ..."
    labels_path = _require(os.path.join(src, "imagelabels.mat"), layout)
    setid_path = _require(os.path.join(src, "setid.mat"), layout)
    image_dir = _require(os.path.join(src, "jpg"), layout)
    numbers = _mat_ints(labels_path, _loadmat(labels_path, ("labels",))["labels"])
    if min(numbers, default=1) < 1:
        raise UserError(f"{labels_path}: labels are 1-based, found {min(numbers)}")
    setid = _loadmat(setid_path, ("trnid", "valid", "tstid"))
    ids = {key: _mat_ints(setid_path, setid[key]) for key in ("trnid", "valid", "tstid")}
    for image_id in ids["trnid"] + ids["valid"] + ids["tstid"]:
        if not 1 <= image_id <= len(numbers):
            raise UserError(f"{setid_path}: image id {image_id} outside 1..{len(numbers)} of imagelabels.mat")

    keys = {"train": ("trnid", "valid"), "test": ("tstid",)}
    listed = {split: sorted((i, f"{setid_path} ({key})") for key in split_keys for i in ids[key])
              for split, split_keys in keys.items()}
    splits = {split: [(os.path.join(image_dir, f"image_{i:05d}.jpg"), numbers[i - 1] - 1) for i, _ in pairs]
              for split, pairs in listed.items()}
    classes = [str(number) for number in range(1, max(numbers, default=0) + 1)]
    return Source(splits, classes, {split: [where for _, where in pairs] for split, pairs in listed.items()})


def chest_xray(src: str) -> Source:
    layout = "the chest X-ray set: train/{NORMAL,PNEUMONIA}/, test/{NORMAL,PNEUMONIA}/"
    root = _locate(src, "train", [".", "chest_xray", os.path.join("chest_xray", "chest_xray")])
    train_dir = _require(os.path.join(root, "train"), layout)
    test_dir = _require(os.path.join(root, "test"), layout)
    classes = class_folders(train_dir)
    return _folders_source({"train": train_dir, "test": test_dir}, classes)


def _folders_source(split_dirs: dict, classes: list) -> Source:
    splits = {split: folder_split(folder, classes) for split, folder in split_dirs.items()}
    return Source(splits, classes, {split: [split_dirs[split]] * len(items) for split, items in splits.items()})


def imagefolder(src: str, test_fraction: float, seed: int) -> Source:
    has = {split: os.path.isdir(os.path.join(src, split)) for split in SPLITS}
    if all(has.values()):
        classes = class_folders(os.path.join(src, "train"))
        return _folders_source({split: os.path.join(src, split) for split in SPLITS}, classes)
    if any(has.values()):
        present, absent = ("train", "test") if has["train"] else ("test", "train")
        raise UserError(f"{src} has {present}/ but no {absent}/: give both, or put the class folders "
                        f"directly in {src} for a seeded split")
    classes = class_folders(src)
    if not classes:
        raise UserError(f"no class folders in {src} (expected {src}/<class>/<image>)")
    if not 0 < test_fraction < 1:
        raise UserError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    splits = {"train": [], "test": []}
    for label, cls in enumerate(classes):
        files = image_files(os.path.join(src, cls))
        # Seeded by class name: a class's split does not change when other classes are added.
        random.Random(f"{seed}:{cls}").shuffle(files)
        n_test = round(len(files) * test_fraction)
        if len(files) >= 2:
            n_test = min(max(n_test, 1), len(files) - 1)
        splits["test"] += [(f, label) for f in sorted(files[:n_test])]
        splits["train"] += [(f, label) for f in sorted(files[n_test:])]
    return Source(splits, classes, {split: [src] * len(items) for split, items in splits.items()})


CONVERTERS = {"aircraft": aircraft, "cub": cub, "dtd": dtd, "stanford_dogs": stanford_dogs,
              "vgg_flower_102": vgg_flower_102, "chest_xray": chest_xray, "imagefolder": imagefolder}


# ---------------------------------------------------------------- images

def _decode(image_bytes: bytes) -> Image.Image:
    """Fully decoded and converted as data.decode_image will (16-bit images scaled to 8 bits), so a truncated
    file fails here, not mid-training."""
    img = to_8bit(Image.open(io.BytesIO(image_bytes)))
    img.load()
    img.convert("RGB")
    return img


def _load(path: str, resize):
    """(image bytes to store, None), or (None, why it cannot be used)."""
    why = unusable_file(path)
    if why is not None:  # a FIFO among the listed images would make open() wait for ever
        return None, why
    try:
        with open(path, "rb") as f:
            data = f.read()
        img = _decode(data)
        if resize is None:
            return data, None
        # No EXIF transpose: decode_image ignores orientation too, so both options give the same pixels.
        img = img.convert("L" if img.mode == "L" else "RGB")
        scale = resize / min(img.size)
        if scale < 1:
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return buf.getvalue(), None
    except Exception as e:  # OSError, PIL's UnidentifiedImageError / DecompressionBombError, ...
        return None, f"{type(e).__name__}: {e}"


def _ordered_map(fn, items, workers: int):
    """map(fn, items) on threads (PIL decodes without the GIL), in order, a bounded window ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 4 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------- build

def _records(items, args, skipped: list, desc: str):
    """(image bytes, label) of each usable image; an unreadable one stops the build, or with
    --skip_bad is left out and appended to `skipped`."""
    loaded = _ordered_map(lambda path: _load(path, args.resize), (path for path, _ in items), args.workers)
    for (path, label), (data, error) in tqdm(zip(items, loaded), total=len(items), desc=desc, unit="img"):
        if error is not None:
            if not args.skip_bad:
                raise UserError(f"cannot read image {path}: {error} (fix or remove it, or pass --skip_bad)")
            tqdm.write(f"skipped unreadable image {path}: {error}", file=sys.stderr)
            skipped.append(path)
            continue
        yield data, label


def _file_identity(path: str) -> tuple:
    """The file `path` names: a link or a second hard link to an image is that image; a missing one its path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return (os.path.realpath(path),)


def _check_listed_once(source: Source, src: str) -> None:
    """Refuses a source that lists an image twice, within a split or in both: an index that puts training images
    into the test split (test1.txt a copy of train1.txt, a repeated line of images.txt) would inflate every
    accuracy measured on it, and the split sizes need not show it."""
    first, repeats = {}, []
    for split, items in source.splits.items():
        for (path, _), where in zip(items, source.listed_in[split], strict=True):
            identity = _file_identity(path)
            if identity in first:
                repeats.append((first[identity], (split, path, where)))
            else:
                first[identity] = (split, path, where)
    if not repeats:
        return
    across = [(a, b) for a, b in repeats if a[0] != b[0]]
    (split_a, path_a, where_a), (split_b, path_b, where_b) = (across or repeats)[0]
    example = (f"{path_b} is listed in {where_a} ({split_a}) and in {where_b} ({split_b})" if path_a == path_b else
               f"{path_a} in {where_a} ({split_a}) and {path_b} in {where_b} ({split_b}) are the same file")
    raise UserError(f"{src}: {len(across)} images are listed in both train and test and {len(repeats) - len(across)} "
                    f"twice within a split; e.g. {example}. Each image must be listed once (a test image that is also "
                    f"a training image inflates the accuracy): fix the index; nothing was written")


def _count(labels, classes) -> dict:
    per_class = Counter(labels)
    return {"total": len(labels), "per_class": {name: per_class.get(label, 0) for label, name in enumerate(classes)}}


def _print_counts(counts: dict, classes) -> None:
    width = max([len(c) for c in classes] + [5])
    print(f"{'label':>5}  {'class':<{width}}  {'train':>6}  {'test':>6}")
    for label, name in enumerate(classes):
        row = "  ".join(f"{counts[split]['per_class'].get(name, 0):>6}" if split in counts else f"{'-':>6}"
                        for split in SPLITS)
        print(f"{label:>5}  {name:<{width}}  {row}")
    print(f"{'':>5}  {'total':<{width}}  " + "  ".join(f"{counts[s]['total'] if s in counts else '-':>6}"
                                                        for s in SPLITS))


def _warn_expected(dataset: str, name: str, counts: dict) -> None:
    for split, expected in EXPECTED_COUNTS.get(dataset, {}).items():
        if split in counts and counts[split]["total"] != expected:
            print(f"warning: {name} {split}: expected {expected} images (standard split), "
                  f"found {counts[split]['total']}", file=sys.stderr)


def _check_target(target: str, src: str, overwrite: bool) -> None:
    real_target, real_src = os.path.realpath(target), os.path.realpath(src)
    if real_src == real_target or real_src.startswith(real_target + os.sep):
        raise UserError(f"--src {src} is inside the output {target}: building would replace the source; "
                        f"choose another --out or --name")
    if os.path.lexists(target) and not _is_empty_dir(target) and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it "
                        f"(the old one is kept until the new one is complete)")


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _move_into_place(partial: str, target: str, overwrite: bool) -> None:
    if _is_empty_dir(target):
        os.rmdir(target)
    if not os.path.lexists(target):
        os.rename(partial, target)
        return
    if not overwrite:  # appeared while we were building
        raise UserError(f"{target} already exists; pass --overwrite to replace it")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    old, i = f"{target}.old-{stamp}", 2
    while os.path.lexists(old):
        old, i = f"{target}.old-{stamp}-{i}", i + 1
    os.rename(target, old)  # kept, as the stages keep a run directory: nothing a user has is deleted
    try:
        os.rename(partial, target)
    except OSError:
        os.rename(old, target)
        raise
    print(f"--overwrite: moved the previous {target} to {old} (delete it once the new one is checked)")


def _check_space(args, source: Source, target: str) -> None:
    """Refuses a build that would not fit: the LMDB files hold the images' bytes (fewer with --resize, which
    is not estimated), so a build that would fill the disk is stopped before it starts, not at its end."""
    if args.resize is not None:
        return
    need = sum(os.path.getsize(path) for items in source.splits.values() for path, _ in items
               if os.path.isfile(path))
    free = shutil.disk_usage(args.out).free
    if need + SPACE_MARGIN > free:
        raise UserError(f"{target} would need about {need / 2**20:.0f} MiB (the images' size) and "
                        f"{SPACE_MARGIN / 2**20:.0f} MiB to spare, but {args.out} has {free / 2**20:.0f} MiB free; "
                        f"free some space, choose another --out, or pass --resize N")


def build(args) -> dict:
    name = args.name or args.dataset
    if args.dataset == "imagefolder" and not args.name:
        raise UserError("imagefolder needs --name NAME (the folder it builds: <out>/NAME)")
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name.startswith("."):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    if args.src is None:
        raise UserError(f"give the dataset's folder: python -m data.prepare {args.dataset} --src PATH")
    if not os.path.isdir(args.src):
        raise UserError(f"--src {args.src} is not a folder")
    if args.resize is not None and args.resize < 1:
        raise UserError(f"--resize must be a positive number of pixels, got {args.resize}")
    target = os.path.join(args.out, name)
    _check_target(target, args.src, args.overwrite)

    if args.dataset == "imagefolder":
        source = imagefolder(args.src, args.test_fraction, args.seed)
    else:
        source = CONVERTERS[args.dataset](args.src)
    _check_listed_once(source, args.src)
    classes = source.classes
    if len(set(classes)) != len(classes):
        raise UserError(f"{args.src}: duplicate class names in the index")
    if name in DATASETS and len(classes) > DATASETS[name]:
        raise UserError(f"{args.src} has {len(classes)} classes, but '{name}' models have {DATASETS[name]}; "
                        f"choose another --name")
    if args.dataset in DATASETS and len(classes) != DATASETS[args.dataset]:
        print(f"warning: {name}: {len(classes)} classes found, the standard dataset has {DATASETS[args.dataset]}",
              file=sys.stderr)
    missing = [path for items in source.splits.values() for path, _ in items if not os.path.isfile(path)]
    if missing and not args.skip_bad:  # fail before spending minutes on the images that are there
        what = "missing image" if not os.path.lexists(missing[0]) else \
            f"cannot use image ({unusable_file(missing[0]) or 'not a regular file'})"
        raise UserError(f"{what} {missing[0]} ({len(missing)} listed images are missing or not regular files; "
                        f"pass --skip_bad to build without them)")
    outputs.make_dir(args.out, "--out")
    _check_space(args, source, target)
    for entry in sorted(os.listdir(args.out)):
        if entry.startswith(f".{name}.partial-"):
            print(f"warning: {os.path.join(args.out, entry)} is left from an interrupted build; delete it "
                  f"to free the space", file=sys.stderr)

    # ---- both splits into a hidden folder, moved into place only once complete
    partial = os.path.join(args.out, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(partial)
    except OSError as e:
        raise UserError(f"cannot write into --out {args.out}: {outputs.failure(e, args.out)}") from None
    try:
        counts = {}
        for split in SPLITS:
            path = os.path.join(partial, f"{split}.lmdb")
            skipped = []
            write_lmdb(path, _records(source.splits[split], args, skipped, desc=f"{name} {split}"))
            counts[split] = _count(LMDBReader(path).labels(), classes)  # what was written, read back
            counts[split]["skipped"] = skipped
        summary = {"name": name, "dataset": args.dataset, "src": os.path.abspath(args.src), "resize": args.resize,
                   "num_classes": len(classes), "classes": classes, "splits": counts,
                   "expected": EXPECTED_COUNTS.get(args.dataset)}
        with open(os.path.join(partial, "counts.json"), "w") as f:
            json.dump(summary, f, indent=1)
        _move_into_place(partial, target, args.overwrite)
    except (OSError, lmdb.Error) as e:  # a full disk (lmdb: DiskError), a folder made read-only meanwhile
        raise UserError(f"cannot write {target}: {outputs.failure(e, args.out)}; nothing was changed there") from None
    finally:
        with contextlib.suppress(OSError):
            _remove(partial)

    # ---- report
    print(f"{name}: wrote {target}/train.lmdb ({counts['train']['total']} images) and "
          f"{target}/test.lmdb ({counts['test']['total']} images), {len(classes)} classes")
    _print_counts(counts, classes)
    print(f"counts stored in {os.path.join(target, 'counts.json')}")
    for split in SPLITS:
        if counts[split]["skipped"]:
            print(f"warning: {name} {split}: skipped {len(counts[split]['skipped'])} unreadable images "
                  f"(listed in counts.json)", file=sys.stderr)
    _warn_expected(args.dataset, name, counts)
    return summary


# ---------------------------------------------------------------- check

def _open_split(root: str, split: str, problems: list):
    """The split's reader (its LMDB file, else its image folder), or None with the reason in `problems`."""
    try:
        reader = split_reader(root, split)
    except UserError as e:  # an image folder's: a test/ class that train/ lacks, an unreadable folder or image
        problems.append(str(e))
        return None
    except Exception as e:  # lmdb.Error, pickle errors, ValueError (a truncated file among them)
        problems.append(f"cannot open {os.path.join(root, f'{split}.lmdb')}: {type(e).__name__}: {e}")
        return None
    if reader is None:
        problems.append(f"missing {os.path.join(root, f'{split}.lmdb')} (or an image folder "
                        f"{os.path.join(root, split)}/<class>/<image>)")
    elif len(reader) == 0:
        problems.append(f"{root} {split}: no images (training refuses an empty split)")
    return reader


def _record_name(reader, index: int, root: str) -> str:
    """A record as its user finds it below the dataset folder `root`: an LMDB file's key, or an image file."""
    if isinstance(reader, LMDBReader):
        return f"{os.path.relpath(reader.path, root)} record {reader.keys[index]!r}"
    return os.path.relpath(reader.items[index][0], root)


def _read_records(reader, root: str, problems: list):
    for index in range(len(reader)):
        try:
            yield index, reader[index]
        except Exception as e:  # missing key, refused or broken pickle, an image file gone meanwhile
            where = os.path.join(root, _record_name(reader, index, root))
            problems.append(f"{where}: cannot read ({type(e).__name__}: {e})")


def _examine(record) -> tuple:
    """(why the image does not decode or None, SHA-256 of its encoded bytes): one record's work, on a thread."""
    _, (image_bytes, _) = record
    digest = hashlib.sha256(image_bytes).digest()
    try:
        _decode(image_bytes)
        return None, digest
    except Exception as e:
        return f"{type(e).__name__}: {e}", digest


def _copies_text(pairs: list) -> str:
    """'later = earlier' for the first few (earlier, later) record names."""
    shown = "; ".join(f"{later} = {earlier}" for earlier, later in pairs[:MAX_LISTED_COPIES])
    return shown + (f"; ... and {len(pairs) - MAX_LISTED_COPIES} more" if len(pairs) > MAX_LISTED_COPIES else "")


def check(args) -> dict:
    name = check_name(args.check, "--check", "--out")
    root = os.path.join(args.out, name)
    if not os.path.isdir(root):
        raise UserError(f"{root} does not exist; build it with `python -m data.prepare`")
    stored = read_counts(root, name, args.out)
    problems, labels = [], {}
    readers = {split: reader for split in SPLITS if (reader := _open_split(root, split, problems)) is not None}
    folder_classes = next((r.classes for r in readers.values() if not isinstance(r, LMDBReader)), None)
    num_classes = DATASETS.get(name) or (stored or {}).get("num_classes") or len(folder_classes or []) or None
    # Copies by content, whoever built the splits: a test image that is also a training image inflates the accuracy.
    first_seen, copies = {}, {"across": [], **{split: [] for split in SPLITS}}
    for split, reader in readers.items():
        examined = _ordered_map(lambda record: (record, _examine(record)), _read_records(reader, root, problems),
                                args.workers)
        labels[split] = []
        for (index, (_, label)), (error, digest) in tqdm(examined, total=len(reader), desc=f"{name} {split}",
                                                          unit="img"):
            record = _record_name(reader, index, root)
            if digest in first_seen:
                first_split, first_record = first_seen[digest]
                copies["across" if first_split != split else split].append((first_record, record))
            else:
                first_seen[digest] = (split, record)
            if error is not None:
                problems.append(f"{os.path.join(root, record)}: image does not decode ({error})")
            if label < 0 or (num_classes is not None and label >= num_classes):
                problems.append(f"{os.path.join(root, record)}: label {label} outside 0..{(num_classes or 0) - 1}")
            else:
                labels[split].append(label)
    if copies["across"]:
        problems.insert(0, f"{root}: the test split holds training images: {len(copies['across'])} test records are "
                           f"byte-for-byte copies of train records ({_copies_text(copies['across'])}); accuracies "
                           f"measured on it are inflated: take the copies out of the test split, or rebuild it "
                           f"from a source whose splits do not overlap")
    if num_classes is None:
        print(f"warning: {name}: class count unknown (not a known dataset, no counts.json); "
              f"labels checked only for being >= 0", file=sys.stderr)
        num_classes = max([max(v, default=-1) for v in labels.values()], default=-1) + 1
    classes = (stored or {}).get("classes") or folder_classes or [str(label) for label in range(num_classes)]
    counts = {split: _count(split_labels, classes) for split, split_labels in labels.items()}
    if stored and isinstance(stored.get("splits"), dict):  # other writers' counts.json may have no splits
        for split in counts:
            want = stored["splits"].get(split) or {}
            if (want.get("total"), want.get("per_class")) != (counts[split]["total"], counts[split]["per_class"]):
                problems.append(f"{root} {split}: counts differ from counts.json "
                                f"({counts[split]['total']} images, counts.json says {want.get('total')})")

    _print_counts(counts, classes)
    _warn_expected((stored or {}).get("dataset", name), name, counts)
    for split in SPLITS:  # they weigh an image twice, but put no training image into the test split
        if copies[split]:
            print(f"warning: {root} {split}: {len(copies[split])} records are byte-for-byte copies of other {split} "
                  f"records ({_copies_text(copies[split])})", file=sys.stderr)
    if problems:
        for problem in problems[:MAX_LISTED_PROBLEMS]:
            print(problem, file=sys.stderr)
        if len(problems) > MAX_LISTED_PROBLEMS:
            print(f"... and {len(problems) - MAX_LISTED_PROBLEMS} more", file=sys.stderr)
        fix = ("fix the folders and files named above" if folder_classes is not None
               else how_to_rebuild(name, args.out))
        raise UserError(f"{root}: {len(problems)} problems found; {fix}")
    print(f"{root}: ok, every record decodes, labels in 0..{num_classes - 1}, no test image is a training image")
    return counts


# ---------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", nargs="?", choices=sorted([*CONVERTERS, *sources.BUILDERS]), metavar="NAME",
                        help=f"converter: one of {', '.join([*CONVERTERS, *sources.BUILDERS])}")
    parser.add_argument("--src", default=None, help="the dataset as downloaded and extracted")
    parser.add_argument("--out", default="data",
                        help="writes <out>/<name>/{train,test}.lmdb and counts.json (default: data)")
    parser.add_argument("--name", default=None,
                        help="output folder name (required for imagefolder; default: the converter's name)")
    parser.add_argument("--resize", type=int, default=None, metavar="N",
                        help="store JPEG (quality 95) with the shorter side shrunk to N, instead of the original bytes")
    parser.add_argument("--skip_bad", action="store_true",
                        help="skip (and list) unreadable or missing images instead of stopping")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing <out>/<name> once the new one is complete; the old one is moved "
                             "to <out>/<name>.old-<date>-<time>")
    parser.add_argument("--test_fraction", type=float, default=0.2,
                        help="imagefolder without train/ and test/: fraction of each class that goes to test "
                             "(default: 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="imagefolder without train/ and test/: split seed; natural_crops: crops; fashion_mnist: "
                             "the --shots images (default: 0)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images (default: min(8, CPUs))")
    parser.add_argument("--check", default=None, metavar="NAME",
                        help="instead of building, decode every record of <out>/NAME (LMDB files or an image "
                             "folder) and check labels, counts, and that no test image is a copy of a training image")
    sources.add_arguments(parser)  # natural_crops, fashion_mnist
    return parser


def main(args):
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.check is not None:
        if args.dataset is not None:
            raise UserError("give either a converter NAME to build or --check NAME, not both")
        return check(args)
    if args.dataset is None:
        raise UserError(f"give a converter NAME ({', '.join(CONVERTERS)}) or --check NAME")
    if args.dataset in sources.BUILDERS:  # built from Debian packages or other sources: data/sources.py
        return sources.build(args)
    return build(args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
