"""The target datasets: where they live on disk, and how an image becomes a training tensor.

A dataset `<name>` lives under `<data_dir>/<name>/` in one of two layouts:
    <name>/train.lmdb, <name>/test.lmdb                 the authors' release (see lmdb_format.py)
    <name>/train/<class>/<image>, <name>/test/<class>/<image>   an image folder (classes sorted by name)

`digits` (scikit-learn's bundled handwritten digits) is written into the LMDB layout on first
use, so the demo and the tests need no download.
"""
import io
import json
import os

import numpy as np
import torch
from PIL import Image

from data.lmdb_format import LMDBReader, write_lmdb
from errors import UserError

# name -> number of classes (SPEC.md §3)
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
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
DIGITS_TEST_SIZE = 500  # of scikit-learn's 1,797 digits; the rest (1,297) is the training split


def how_to_get(name: str, data_dir: str) -> str:
    if name in DATASETS:
        return (f"download data.tar.gz of the original release and run `tar zxvf data.tar.gz` "
                f"(it creates {data_dir}/{name}/), or build it with `python -m data.prepare {name} --src PATH`")
    return f"build it with `python -m data.prepare imagefolder --src PATH --name {name}`"


def dataset_dir(name: str, data_dir: str) -> str:
    """The folder of `name`, checked; `digits` is built on first use."""
    root = os.path.join(data_dir, name)
    if name == "digits" and not os.path.exists(os.path.join(root, "train.lmdb")):
        write_digits(root)
    if not os.path.isdir(root):
        if name not in DATASETS:
            known = ", ".join(sorted(DATASETS))
            raise UserError(f"unknown dataset '{name}': choose one of {known}, or put your own images "
                            f"in {root}/ ({how_to_get(name, data_dir)})")
        raise UserError(f"dataset '{name}' not found: expected {root}/train.lmdb and {root}/test.lmdb; "
                        f"{how_to_get(name, data_dir)}")
    return root


def _folder_items(split_dir: str) -> tuple[list[tuple[str, int]], list[str]]:
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    items = []
    for label, cls in enumerate(classes):
        for root, _, files in sorted(os.walk(os.path.join(split_dir, cls))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."):  # macOS ._x.jpg
                    items.append((os.path.join(root, f), label))
    return items, classes


class _FolderReader:
    """Same interface as LMDBReader, over <split>/<class>/<image> files."""

    def __init__(self, split_dir: str):
        self.items, self.classes = _folder_items(split_dir)
        self.keys = [os.path.relpath(p, split_dir).encode() for p, _ in self.items]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with open(path, "rb") as f:
            return f.read(), label

    def labels(self):
        return [label for _, label in self.items]


def decode_image(image_bytes: bytes, image_size: int, resample: int = Image.BILINEAR) -> torch.Tensor:
    """Encoded image -> (3, S, S) uint8, resized without keeping the aspect ratio with the PIL filter
    `resample` (the model's image processor's; bilinear by default), as the release's ViT image processor
    did. Normalisation happens later, on the device."""
    with Image.open(io.BytesIO(image_bytes)) as img:
        img = img.convert("RGB").resize((image_size, image_size), resample)
        array = np.array(img, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, S, S); contiguous batches stack fast


class ImageDataset(torch.utils.data.Dataset):
    """One split of a dataset; item = ((3, S, S) uint8 image, label)."""

    def __init__(self, name: str, split: str, data_dir: str, image_size: int, resample: int = Image.BILINEAR):
        self.name, self.split, self.image_size, self.resample = name, split, image_size, resample
        self.root = root = dataset_dir(name, data_dir)
        lmdb_path, folder = os.path.join(root, f"{split}.lmdb"), os.path.join(root, split)
        if os.path.exists(lmdb_path):
            try:
                self.reader = LMDBReader(lmdb_path)
            except Exception as e:  # lmdb.Error, pickle errors, ValueError
                raise UserError(f"cannot read {lmdb_path}: {e}; rebuild it with "
                                f"`python -m data.prepare` or re-extract data.tar.gz") from None
        elif os.path.isdir(folder):
            self.reader = _FolderReader(folder)
        else:
            raise UserError(f"dataset '{name}' has no {split} split: expected {lmdb_path} or {folder}/<class>/; "
                            f"{how_to_get(name, data_dir)}")
        if len(self.reader) == 0:
            raise UserError(f"dataset '{name}' split '{split}' is empty ({root})")

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
        if os.path.exists(counts := os.path.join(self.root, "counts.json")):
            with open(counts) as f:
                return int(json.load(f)["num_classes"])
        if isinstance(self.reader, _FolderReader):
            return len(self.reader.classes)
        return max(self.reader.labels()) + 1


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
    # Built in a private folder, then moved into place: processes of a torchrun job may race here.
    tmp = os.path.join(root, f".building-{os.getpid()}")
    for split, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        write_lmdb(os.path.join(tmp, f"{split}.lmdb"), ((_png(images[i]), int(digits.target[i])) for i in idx))
    for split in ("test", "train"):  # train last: its presence means "built"
        os.replace(os.path.join(tmp, f"{split}.lmdb"), os.path.join(root, f"{split}.lmdb"))
    os.rmdir(tmp)
