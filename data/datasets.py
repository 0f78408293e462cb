"""The target datasets: where they live on disk, and how an image becomes a training tensor.

A dataset `<name>` lives under `<data_dir>/<name>/` in one of two layouts:
    <name>/train.lmdb, <name>/test.lmdb                 the authors' release (see lmdb_format.py)
    <name>/train/<class>/<image>, <name>/test/<class>/<image>   an image folder
The classes of an image folder are the sorted folders of train/ (hidden ones skipped), for both splits.

`digits` (scikit-learn's bundled handwritten digits) is written into the LMDB layout on first
use, so the demo and the tests need no download.
"""
import io
import json
import os
import shutil
import stat
import sys
from collections import Counter

import lmdb
import numpy as np
import torch
from PIL import Image

import outputs
from data.lmdb_format import LMDBReader, file_kind, write_lmdb
from errors import UserError

# name -> number of classes (docs/data.md)
DATASETS = {
    "aircraft": 100,
    "chest_xray": 2,
    "cub": 200,
    "dtd": 47,
    "stanford_dogs": 120,
    "vgg_flower_102": 102,
    "digits": 10,
}
SPLITS = ("train", "test")
BUILT_BY_PREPARE = ("natural_crops", "fashion_mnist")  # data.prepare builds these from Debian packages or --src
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_TEST_SIZE = 500  # of scikit-learn's 1,797 digits; the rest (1,297) is the training split


def how_to_get(name: str, data_dir: str) -> str:
    if name == "digits":
        return how_to_rebuild(name, data_dir)
    if name in DATASETS:
        return (f"download data.tar.gz of the original release and run `tar zxvf data.tar.gz` "
                f"(it creates {data_dir}/{name}/), or build it with `python -m data.prepare {name} --src PATH`")
    if name in BUILT_BY_PREPARE:  # the small reproduction's datasets (data/sources.py)
        return f"build it with `python -m data.prepare {name} --out {data_dir}` (see its --help)"
    return f"build it with `python -m data.prepare imagefolder --src PATH --name {name}`"


def how_to_rebuild(name: str, data_dir: str) -> str:
    """What to do about a damaged dataset folder."""
    if name == "digits":
        return f"digits is built from scikit-learn on first use: delete {os.path.join(data_dir, name)} to rebuild it"
    if name in DATASETS:
        return (f"re-extract it from data.tar.gz, or rebuild it with "
                f"`python -m data.prepare {name} --src PATH --out {data_dir} --overwrite`")
    return (f"rebuild it with `python -m data.prepare imagefolder --src PATH --name {name} "
            f"--out {data_dir} --overwrite`")


def check_name(name: str, flag: str = "--dataset", root_flag: str = "--data_dir") -> str:
    """`name` if it names a dataset: one visible folder under the data root. A path (absolute, ./x, a/b, x/, ..)
    is refused: os.path.join would let it escape the data root, and the stages derive their run directories
    from the name, so `--dataset /data/cub` made the run directory the dataset folder itself."""
    if name.startswith(".") and name not in (".", "..") and os.sep not in name and "/" not in name:
        raise UserError(f"{flag} {name!r} names a hidden folder, which is never a dataset; rename it "
                        f"({root_flag} gives the folder that holds the datasets)")
    if name and name not in (".", "..") and "/" not in name and os.sep not in name:
        return name
    parent, base = os.path.split(os.path.normpath(name)) if name else ("", "")
    hint = (f"pass {root_flag} {parent or '.'} {flag} {base}" if base not in ("", ".", "..", os.sep)
            else f"give the name of a folder under {root_flag}")
    what = "is empty" if not name else "is a path"
    raise UserError(f"{flag} {name!r} {what}, but it takes a dataset name, a folder under {root_flag} (which "
                    f"gives the folder that holds the datasets): {hint}")


def dataset_dir(name: str, data_dir: str) -> str:
    """The folder of `name`, checked; `digits` is built on first use (a missing split file is rebuilt)."""
    root = os.path.join(data_dir, check_name(name))
    if name == "digits" and not all(os.path.exists(os.path.join(root, f"{split}.lmdb")) for split in SPLITS):
        write_digits(root)
    if not os.path.isdir(root):
        if name not in DATASETS:
            known = ", ".join(sorted(DATASETS))
            raise UserError(f"unknown dataset '{name}': choose one of {known}, or put your own images "
                            f"in {root}/ ({how_to_get(name, data_dir)})")
        raise UserError(f"dataset '{name}' not found: expected {root}/train.lmdb and {root}/test.lmdb; "
                        f"{how_to_get(name, data_dir)}")
    return root


COUNTS_FILE = "counts.json"  # data.prepare's record of a dataset it built: num_classes, classes, splits


def read_counts(root: str, name: str, data_dir: str) -> dict | None:
    """<root>/counts.json, checked (None if there is none): a JSON object whose num_classes is a whole number
    >= 1 and whose classes, if given, name that many classes. Anything else is an error naming the file, found
    when the dataset is opened, not after training (the classifier's label names come from it)."""
    path = os.path.join(root, COUNTS_FILE)
    if not os.path.lexists(path):
        return None
    try:
        if not os.path.isfile(path):
            raise ValueError(f"{file_kind(os.stat(path).st_mode)}, not a file")
        with open(path, encoding="utf-8") as f:
            counts = json.load(f)
        if not isinstance(counts, dict):
            raise ValueError("not a JSON object")
        n = counts.get("num_classes")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"num_classes is {n!r}, not a whole number >= 1")
        classes = counts.get("classes")
        if classes is not None and not (isinstance(classes, list) and len(classes) == n):
            raise ValueError(f"classes is not a list of {n} names")
    except (OSError, ValueError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot read {path} ({reason}); {how_to_rebuild(name, data_dir)}") from None
    return counts


# ---------------------------------------------------------------- image folders (also data.prepare's rules)

def _entries(folder: str) -> list[os.DirEntry]:
    """The entries of `folder`, sorted by name; a folder that cannot be read is an error naming it (os.walk
    skipped it without a word: an unreadable test/ class folder silently dropped its images)."""
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise UserError(f"cannot read the folder {folder}: {e.strerror or e}") from None


def class_folders(folder: str) -> list[str]:
    """The class folders of `folder`, sorted; hidden ones (.ipynb_checkpoints, .DS_Store) and __MACOSX left out."""
    return [e.name for e in _entries(folder)
            if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"]


def unusable_file(path: str) -> str | None:
    """Why `path` cannot be read as a file: missing (a broken link), a FIFO, socket or device (reading one waits
    for ever or yields nothing), or unreadable; None if it can be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISREG(st.st_mode):
        return f"{file_kind(st.st_mode)}, not an image file"
    if not os.access(path, os.R_OK):
        return "Permission denied"
    return None


def image_files(folder: str) -> list[str]:
    """Images under `folder`, sorted; hidden files (macOS '._x.jpeg' copies in zips) and folders left out, as are
    files without an image extension and subfolders reached through a link (os.walk's rule). A folder that cannot
    be read, or an image that is not a readable regular file, is an error naming it."""
    files = []

    def walk(path: str) -> None:
        for entry in _entries(path):
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path)
            elif entry.name.lower().endswith(IMAGE_EXTENSIONS) and not entry.is_dir():
                files.append(entry.path)
    walk(folder)
    bad = [(path, why) for path in files if (why := unusable_file(path)) is not None]
    if bad:
        path, why = bad[0]
        more = f" ({len(bad)} such files under {folder})" if len(bad) > 1 else ""
        raise UserError(f"cannot read the image {path}: {why}{more}")
    return sorted(files)


def folder_split(split_dir: str, classes: list[str]) -> list[tuple[str, int]]:
    """(image path, label) of <split_dir>/<class>/..., labels from `classes` (train/'s list), so that a
    class missing from one split does not shift the labels of the others."""
    present = set(class_folders(split_dir))
    unknown = sorted(present - set(classes))
    if unknown:
        raise UserError(f"{split_dir} has class folders that train/ lacks: {', '.join(unknown)} "
                        f"(the classifier's classes are train/'s; add them there or remove them)")
    return [(path, label) for label, cls in enumerate(classes) if cls in present
            for path in image_files(os.path.join(split_dir, cls))]


class _FolderReader:
    """Same interface as LMDBReader, over <root>/<split>/<class>/<image> files; classes from <root>/train/."""

    def __init__(self, root: str, split: str):
        train_dir, split_dir = os.path.join(root, "train"), os.path.join(root, split)
        if not os.path.isdir(train_dir):
            raise UserError(f"{split_dir}/ is an image folder but {train_dir}/ is not: the class list comes "
                            f"from train/ (give both splits as folders)")
        self.classes = class_folders(train_dir)
        self.items = folder_split(split_dir, self.classes)
        self.keys = [os.path.relpath(p, split_dir).encode() for p, _ in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with open(path, "rb") as f:
            return f.read(), label

    def labels(self):
        return [label for _, label in self.items]


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes of 16-bit PNGs and TIFFs
FLOAT_MODE = "F"  # 32-bit float grayscale (float TIFFs)


def to_8bit(img: Image.Image) -> Image.Image:
    """`img` with 8 bits per channel. The full range of the image's type is mapped onto 0..255, by one rule for
    every image whatever range it uses (no per-image stretching: intensities keep their meaning across images):
    - 16-bit grayscale (PIL mode I;16 or I: 16-bit PNG/TIFF, common for X-rays) becomes mode L by round(v / 257),
      0..65535 onto 0..255 (the inverse of the PNG rule v8 * 257); values outside 0..65535 are clipped, and
      12-bit data (0..4095) comes out dark (0..16);
    - float grayscale (mode F: 32-bit float TIFFs) holds 0..1 by the convention of float images, and becomes
      mode L by round(v * 255); values outside 0..1 are clipped, NaN is 0.
    PIL's own convert would clip every value above 255 to white, and a float image in 0..1 to black.
    Other modes are returned unchanged."""
    if img.mode in SIXTEEN_BIT_MODES:
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)  # (H, W)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if img.mode == FLOAT_MODE:
        values = np.clip(np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0), 0.0, 1.0)  # (H, W)
        return Image.fromarray(np.floor(values * 255 + 0.5).astype(np.uint8))
    return img


def decode_image(image_bytes: bytes, image_size: int, resample: int = Image.BILINEAR) -> torch.Tensor:
    """Encoded image -> (3, S, S) uint8, resized without keeping the aspect ratio with the PIL filter
    `resample` (the model's image processor's; bilinear by default), as the release's ViT image processor
    did. 16-bit images are scaled to 8 bits first (to_8bit). Normalisation happens later, on the device."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        img = to_8bit(img).convert("RGB").resize((image_size, image_size), resample)
        array = np.array(img, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, S, S); contiguous batches stack fast


def split_reader(root: str, split: str):
    """The reader of one split of the dataset folder `root`: an LMDBReader of <split>.lmdb if that exists (the
    release's layout), else an image-folder reader of <split>/ (whose errors are UserErrors naming the folder),
    else None. An LMDB file that cannot be opened raises lmdb.Error, a pickle error or ValueError."""
    lmdb_path, folder = os.path.join(root, f"{split}.lmdb"), os.path.join(root, split)
    if os.path.lexists(lmdb_path):
        return LMDBReader(lmdb_path)
    if os.path.isdir(folder):
        return _FolderReader(root, split)
    return None


def open_split(name: str, split: str, data_dir: str):
    """(the dataset's folder, the split's reader: an LMDBReader or an image-folder reader), checked."""
    root = dataset_dir(name, data_dir)
    lmdb_path, folder = os.path.join(root, f"{split}.lmdb"), os.path.join(root, split)
    try:
        reader = split_reader(root, split)
    except UserError:
        raise
    except Exception as e:  # lmdb.Error, pickle errors, ValueError (a truncated file among them)
        raise UserError(f"cannot read {lmdb_path}: {e}; {how_to_rebuild(name, data_dir)}") from None
    if reader is None:
        raise UserError(f"dataset '{name}' has no {split} split: expected {lmdb_path} or {folder}/<class>/; "
                        f"{how_to_get(name, data_dir)}")
    if len(reader) == 0:
        raise UserError(f"dataset '{name}' split '{split}' is empty ({root})")
    return root, reader


class ImageDataset(torch.utils.data.Dataset):
    """One split of a dataset; item = ((3, S, S) uint8 image, label)."""

    def __init__(self, name: str, split: str, data_dir: str, image_size: int, resample: int = Image.BILINEAR):
        self.name, self.split, self.image_size, self.resample = name, split, image_size, resample
        self.data_dir = data_dir
        self.root, self.reader = open_split(name, split, data_dir)
        if split == "train" and isinstance(self.reader, _FolderReader):
            _warn_small_classes(name, self.reader)
        self.counts = read_counts(self.root, name, data_dir)  # data.prepare's record, or None

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        try:
            image_bytes, label = self.reader[index]
            return decode_image(image_bytes, self.image_size, self.resample), label
        except Exception as e:
            key = self.reader.keys[index]
            raise UserError(f"dataset '{self.name}' split '{self.split}' record {key!r}: "
                            f"cannot decode ({type(e).__name__}: {e})") from None

    def num_classes(self) -> int:
        """The registry's count; for other datasets data.prepare's counts.json, else the labels seen."""
        if self.name in DATASETS:
            return DATASETS[self.name]
        if self.counts is not None:
            return self.counts["num_classes"]
        if isinstance(self.reader, _FolderReader):
            return len(self.reader.classes)
        return max(self.reader.labels()) + 1

    def check_labels(self, num_classes: int) -> None:
        """Every label in 0..num_classes-1, checked before training: a bad one would otherwise stop
        training (or evaluation, hours later) with a traceback deep inside cross-entropy."""
        bad = [(key, label) for key, label in zip(self.reader.keys, self.reader.labels())
               if not 0 <= label < num_classes]
        if bad:
            key, label = bad[0]
            raise UserError(f"dataset '{self.name}' split '{self.split}' has label {label} (record {key!r}; "
                            f"{len(bad)} of {len(self)} records out of range), but the dataset has "
                            f"{num_classes} classes (labels 0..{num_classes - 1}); "
                            f"{how_to_rebuild(self.name, self.data_dir)}")


def check_labels(train: ImageDataset, *others: ImageDataset) -> int:
    """Checks the labels of every split against the training split's number of classes; returns it."""
    num_classes = train.num_classes()
    for dataset in (train, *others):
        dataset.check_labels(num_classes)
    return num_classes


def _warn_small_classes(name: str, reader: _FolderReader) -> None:
    """One line on stderr (from the first process only) for train/ classes with no or one image."""
    if os.environ.get("RANK", "0") != "0":
        return
    per_class = Counter(reader.labels())
    empty = [cls for label, cls in enumerate(reader.classes) if per_class[label] == 0]
    single = [cls for label, cls in enumerate(reader.classes) if per_class[label] == 1]
    if empty or single:
        parts = [f"{what}: {', '.join(classes[:10])}{' ...' if len(classes) > 10 else ''}"
                 for what, classes in (("no images", empty), ("one image", single)) if classes]
        print(f"warning: dataset '{name}' train/ has classes with {'; '.join(parts)} "
              f"(the model can hardly learn them)", file=sys.stderr)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_digits(root: str) -> None:
    """scikit-learn's 8x8 digits (values 0..16) as grayscale PNGs, in the release's LMDB layout.

    The split is fixed (stratified, random_state=0), so every machine builds the same files."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 8, 8)
    index = np.arange(len(images))
    train_idx, test_idx = train_test_split(index, test_size=DIGITS_TEST_SIZE, random_state=0,
                                           stratify=digits.target)
    # Only the missing split files are written (an existing one is the same, and may be open elsewhere), in a
    # private folder, then moved into place: processes of a torchrun job may race here.
    missing = [split for split in SPLITS if not os.path.exists(os.path.join(root, f"{split}.lmdb"))]
    if not missing:
        return
    tmp = outputs.temporary(os.path.join(root, ".building"))
    try:
        os.makedirs(root, exist_ok=True)
        outputs.remove_stale_temporaries(root)  # builds killed before they finished
        shutil.rmtree(tmp, ignore_errors=True)  # left by a killed build that had our process id
        for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
            if split in missing:
                write_lmdb(os.path.join(tmp, f"{split}.lmdb"),
                           ((_png(images[i]), int(digits.target[i])) for i in idx))
        for split in missing:
            os.replace(os.path.join(tmp, f"{split}.lmdb"), os.path.join(root, f"{split}.lmdb"))
    except (OSError, lmdb.Error) as e:  # a --data_dir that is a file, read-only or full (lmdb: DiskError)
        raise UserError(f"cannot build digits in {root} ({outputs.failure(e, outputs.existing_parent(root))}); "
                        f"it is written there on first use: pass a --data_dir you can write") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
