"""Build data/<name>/{train,test}.lmdb (the release's format, docs/data.md) from a dataset as its owners publish it.

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
    chemprot, citation_intent, sciie, twitter_emotion, fortunes, text_csv, text_jsonl
                    text datasets, written as <out>/<name>/{train,test[,dev]}.jsonl + counts.json
                    (data/text.py, data/text_sources.py, which list their options)
    hf              a Hugging Face `datasets` source: a Hub id, a save_to_disk folder, parquet files or an
                    image folder, --image_column / --label_column of --train_split / --test_split. Needs
                    --name and the `datasets` package (data/hf.py, which lists its rules)
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
import os
import random
import sys

import numpy as np
import scipy.io

from data import hf, sources, text, text_sources
from data.build import (EXPECTED_COUNTS, Source, check_listed_once, check_space, check_target, records, report,
                        warn_expected, write_dataset)
from data.check import check
from data.datasets import DATASETS, SPLITS, class_folders, file_kind, folder_split, image_files, unusable_file
import outputs
from errors import UserError


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


# ---------------------------------------------------------------- build

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
    check_target(target, args.src, args.overwrite)

    if args.dataset == "imagefolder":
        source = imagefolder(args.src, args.test_fraction, args.seed)
    else:
        source = CONVERTERS[args.dataset](args.src)
    check_listed_once(source, args.src)
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
    check_space(args, source, target)
    for entry in sorted(os.listdir(args.out)):
        if entry.startswith(f".{name}.partial-"):
            print(f"warning: {os.path.join(args.out, entry)} is left from an interrupted build; delete it "
                  f"to free the space", file=sys.stderr)

    # ---- both splits into a hidden folder, moved into place only once complete
    written = {}
    for split in SPLITS:
        skipped = []
        written[split] = (records(source.splits[split], args, skipped, desc=f"{name} {split}"), skipped)
    summary = write_dataset(args, name, target, written, classes,
                            {"name": name, "dataset": args.dataset, "src": os.path.abspath(args.src),
                             "resize": args.resize},
                            after={"expected": EXPECTED_COUNTS.get(args.dataset)})
    report(name, target, summary["splits"], classes)
    warn_expected(args.dataset, name, summary["splits"])
    return summary



# ---------------------------------------------------------------- command line

def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog="python -m data.prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [*CONVERTERS, *sources.BUILDERS, *text_sources.BUILDERS, "hf"]
    parser.add_argument("dataset", nargs="?", choices=sorted(names), metavar="NAME",
                        help=f"converter: one of {', '.join(names)}")
    parser.add_argument("--src", default=None,
                        help="the dataset as downloaded and extracted (hf: also a Hub id or a parquet file)")
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
                        help="imagefolder without train/ and test/, fortunes: fraction of each class that goes to "
                             "test (default: 0.2)")
    parser.add_argument("--seed", type=int, default=0,
                        help="imagefolder without train/ and test/, fortunes: split seed; natural_crops: crops; "
                             "fashion_mnist: the --shots images (default: 0)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="threads decoding images (default: min(8, CPUs))")
    parser.add_argument("--check", default=None, metavar="NAME",
                        help="instead of building, decode every record of <out>/NAME (LMDB files or an image "
                             "folder) and check labels, counts, and that no test image is a copy of a training image")
    parser.add_argument("--label_column", default="label",
                        help="hf, text_csv, text_jsonl: the column (a CSV header name, a JSON key) of the labels")
    sources.add_arguments(parser)  # natural_crops, fashion_mnist
    text_sources.add_arguments(parser)
    hf.add_arguments(parser)
    return parser


def main(args):
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    if args.check is not None:
        if args.dataset is not None:
            raise UserError("give either a converter NAME to build or --check NAME, not both")
        return text.check(args) if text.is_text_dataset(os.path.join(args.out, args.check)) else check(args)
    if args.dataset is None:
        names = [*CONVERTERS, *sources.BUILDERS, *text_sources.BUILDERS, "hf"]
        raise UserError(f"give a converter NAME ({', '.join(names)}) or --check NAME")
    if args.dataset in sources.BUILDERS:  # built from Debian packages or other sources: data/sources.py
        return sources.build(args)
    if args.dataset in text_sources.BUILDERS:  # data/text_sources.py
        return text_sources.build(args)
    if args.dataset == "hf":  # a Hugging Face `datasets` source: data/hf.py
        return hf.build(args)
    return build(args)


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
