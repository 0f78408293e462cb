"""Decode once: a split decoded and resized into one uint8 tensor, kept in memory (on the GPU when it fits).

The recipe's preprocessing is deterministic (resize to the model's input size with the checkpoint's
filter, no random crop; the flip is drawn on the device), so decoding every image again at every step
only costs time. `load_or_decode` decodes a split once, in order, with a DataLoader over the workers,
and gives (images (N, 3, S, S) uint8, labels (N,) int64); batches are then gathered by index. The
tensors are the ones the streaming path stacks, so batches are bit-identical.

A copy on disk lets a second run skip the decoding:
    <data_dir>/<name>/.cache/<split>-<size>-<resample>-<fingerprint>.pt
The fingerprint covers the split's content (data.identity.split_fingerprint: every record, or every image
file's bytes, path and label; not sizes and times, which `cp -p` and `rsync -a` keep while the bytes change)
and the decoding code (data/datasets.py, Pillow's version), so changed data, another image size or another
filter never reads a stale file.

Writing the copy is an extra: a disk that is full or read-only is a one-line notice and the run goes on
from memory; a copy that would leave less than FREE_MARGIN free is not started (the run's own checkpoints
need the space). The temporary file is removed on every way out, and those of dead processes when the next
run writes here (outputs.remove_stale_temporaries).
"""
import hashlib
import os
import shutil

import PIL
import torch

import outputs
from data.identity import split_fingerprint

CACHE_DIR = ".cache"
RAM_FRACTION = 0.5  # a split is kept in memory when it takes at most this fraction of the available RAM
GPU_FRACTION = 0.25  # ... and on the GPU when it takes at most this fraction of its free memory
FREE_MARGIN = 1 << 30  # bytes a disk copy must leave free on its filesystem
_DECODE_BATCH = 64


def split_bytes(num_images: int, image_size: int) -> int:
    return num_images * 3 * image_size * image_size


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or the free pages elsewhere."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fingerprint(dataset) -> str:
    """A digest of what the decoded tensor depends on, other than the size and the filter (in the name)."""
    from data import datasets  # the decoding code: an edit there (e.g. 16-bit PNGs) invalidates every file
    h = hashlib.sha256()
    with open(datasets.__file__, "rb") as f:
        h.update(f.read())
    h.update(f"Pillow {PIL.__version__}\n".encode())
    h.update(split_fingerprint(dataset)["sha256"].encode())
    return h.hexdigest()[:16]


def cache_path(dataset) -> str:
    name = f"{dataset.split}-{dataset.image_size}-{dataset.resample}-{fingerprint(dataset)}.pt"
    return os.path.join(dataset.root, CACHE_DIR, name)


def decode(dataset, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every item of `dataset`, in order: (N, 3, S, S) uint8 and (N,) int64."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=_DECODE_BATCH, shuffle=False, num_workers=workers,
                                         prefetch_factor=4 if workers > 0 else None)
    images = labels = None
    start = 0
    for batch_images, batch_labels in loader:
        if images is None:
            images = torch.empty((len(dataset), *batch_images.shape[1:]), dtype=torch.uint8)
            labels = torch.empty(len(dataset), dtype=torch.int64)
        images[start:start + len(batch_images)] = batch_images
        labels[start:start + len(batch_labels)] = batch_labels
        start += len(batch_images)
    return images, labels


def load_or_decode(dataset, workers: int, write: bool, notice=print) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images, labels, how): the decoded split, read from the disk cache when a valid one is there, else
    decoded (and written there when `write`). A dataset without a folder on disk (not a data.ImageDataset)
    is decoded only."""
    path = cache_path(dataset) if hasattr(dataset, "reader") and hasattr(dataset, "root") else None
    if path is not None and write:
        outputs.remove_stale_temporaries(os.path.dirname(path))
    if path is not None and os.path.isfile(path):  # a regular file: opening a FIFO would wait forever
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            images, labels = saved["images"], saved["labels"]
            size = dataset.image_size
            if images.dtype == torch.uint8 and images.shape == (len(dataset), 3, size, size) \
                    and labels.shape == (len(dataset),):
                return images, labels, f"read from {path}"
        except Exception:  # a damaged file is decoded again and replaced
            pass
    images, labels = decode(dataset, workers)
    if path is not None and write:
        _write(path, images, labels, notice)
    return images, labels, "decoded once"


def _write(path: str, images: torch.Tensor, labels: torch.Tensor, notice) -> None:
    """The disk copy, atomically; any failure is one notice (torch.save reports a full disk or a read-only
    folder as RuntimeError, not OSError)."""
    folder = os.path.dirname(path)
    need = images.numel() + 8 * labels.numel()
    try:
        os.makedirs(folder, exist_ok=True)
        free = shutil.disk_usage(folder).free
        if free < need + FREE_MARGIN:
            notice(f"note: decoded images not cached on disk: {need / 2**20:.0f} MiB would leave less than "
                   f"{FREE_MARGIN / 2**30:.0f} GiB of the {free / 2**20:.0f} MiB free in {folder}; this run "
                   f"keeps them in memory")
            return
        with outputs.atomic(path) as tmp:
            torch.save({"images": images, "labels": labels}, tmp)
    except (OSError, RuntimeError) as e:
        notice(f"note: decoded images not cached on disk ({outputs.failure(e, folder)}: {path}); this run "
               f"keeps them in memory")
