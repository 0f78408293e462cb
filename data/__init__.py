"""Dataset readers and writers. Downloaded or built datasets live in data/<name>/ (git-ignored)."""
from data.datasets import DATASETS, SPLITS, ImageDataset, check_labels, decode_image, dataset_dir, write_digits
from data.lmdb_format import LMDBReader, plain_loads, write_lmdb

__all__ = ["DATASETS", "SPLITS", "ImageDataset", "LMDBReader", "check_labels", "dataset_dir", "decode_image",
           "plain_loads", "write_digits", "write_lmdb"]
