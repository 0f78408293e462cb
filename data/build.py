"""Writing a dataset folder <out>/<name>/{train,test}.lmdb + counts.json, the machinery shared by
data.prepare's converters, data/sources.py's builders and data/hf.py: the images decoded and loaded on threads, the
refusals before anything is written (an image listed twice, a build that would not fit, a target that exists or
holds the source), the counts read back and printed, and the move into place that keeps an old dataset aside.
"""
import contextlib
import datetime
import io
import json
import os
import shutil
import sys
import uuid
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import lmdb
from PIL import Image
from tqdm import tqdm

import outputs
from data.datasets import SPLITS, to_8bit, unusable_file
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
SPACE_MARGIN = 64 << 20  # bytes a build leaves free beyond the images' size (LMDB pages, counts.json)


class Source(NamedTuple):
    """What a converter reads from a published layout: the images of each split, the class names, the index files."""
    splits: dict  # split -> list of (image path, 0-based label)
    classes: list  # label -> class name
    listed_in: dict  # split -> where each of its images is listed (an index file, a folder), in the same order


# ---------------------------------------------------------------- images

def decode(image_bytes: bytes) -> Image.Image:
    """Fully decoded and converted as data.decode_image will (16-bit images scaled to 8 bits), so a truncated
    file fails here, not mid-training."""
    img = to_8bit(Image.open(io.BytesIO(image_bytes)))
    img.load()
    img.convert("RGB")
    return img


def encode(image_bytes: bytes, resize) -> bytes:
    """The bytes to store for an image: its own (decoded once here, so a broken one fails now), or with `resize`
    a JPEG whose shorter side is `resize` (never enlarged). Raises what decoding raises."""
    img = decode(image_bytes)
    if resize is None:
        return image_bytes
    # No EXIF transpose: decode_image ignores orientation too, so both options give the same pixels.
    img = img.convert("L" if img.mode == "L" else "RGB")
    scale = resize / min(img.size)
    if scale < 1:
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _load(path: str, resize):
    """(image bytes to store, None), or (None, why it cannot be used)."""
    why = unusable_file(path)
    if why is not None:  # a FIFO among the listed images would make open() wait for ever
        return None, why
    try:
        with open(path, "rb") as f:
            return encode(f.read(), resize), None
    except Exception as e:  # OSError, PIL's UnidentifiedImageError / DecompressionBombError, ...
        return None, f"{type(e).__name__}: {e}"


def ordered_map(fn, items, workers: int):
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

def records(items, args, skipped: list, desc: str, load=None):
    """(image bytes, label) of each usable image; an unreadable one stops the build, or with
    --skip_bad is left out and appended to `skipped`. `items` are (image, label): image files, or what
    `load` takes and turns into (bytes to store, None) or (None, why not), its str() naming the image."""
    load = load or (lambda path: _load(path, args.resize))
    loaded = ordered_map(load, (path for path, _ in items), args.workers)
    for (path, label), (data, error) in tqdm(zip(items, loaded), total=len(items), desc=desc, unit="img"):
        if error is not None:
            if not args.skip_bad:
                raise UserError(f"cannot read image {path}: {error} (fix or remove it, or pass --skip_bad)")
            tqdm.write(f"skipped unreadable image {path}: {error}", file=sys.stderr)
            skipped.append(str(path))
            continue
        yield data, label


def _file_identity(path: str) -> tuple:
    """The file `path` names: a link or a second hard link to an image is that image; a missing one its path."""
    try:
        st = os.stat(path)
        return st.st_dev, st.st_ino
    except OSError:
        return (os.path.realpath(path),)


def check_listed_once(source: Source, src: str) -> None:
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


def count(labels, classes) -> dict:
    """{total, per_class: {class name: images}} of a split's labels."""
    per_class = Counter(labels)
    return {"total": len(labels), "per_class": {name: per_class.get(label, 0) for label, name in enumerate(classes)}}


def print_counts(counts: dict, classes) -> None:
    """The table of images per class and split, with the totals."""
    width = max([len(c) for c in classes] + [5])
    print(f"{'label':>5}  {'class':<{width}}  {'train':>6}  {'test':>6}")
    for label, name in enumerate(classes):
        row = "  ".join(f"{counts[split]['per_class'].get(name, 0):>6}" if split in counts else f"{'-':>6}"
                        for split in SPLITS)
        print(f"{label:>5}  {name:<{width}}  {row}")
    print(f"{'':>5}  {'total':<{width}}  " + "  ".join(f"{counts[s]['total'] if s in counts else '-':>6}"
                                                        for s in SPLITS))


def warn_expected(dataset: str, name: str, counts: dict) -> None:
    """A warning on stderr for each split whose size differs from the standard split's (not an error)."""
    for split, expected in EXPECTED_COUNTS.get(dataset, {}).items():
        if split in counts and counts[split]["total"] != expected:
            print(f"warning: {name} {split}: expected {expected} images (standard split), "
                  f"found {counts[split]['total']}", file=sys.stderr)


def check_target(target: str, src: str, overwrite: bool) -> None:
    """Refuses a target that holds the source, or that exists and is not empty without --overwrite."""
    real_target, real_src = os.path.realpath(target), os.path.realpath(src)
    if real_src == real_target or real_src.startswith(real_target + os.sep):
        raise UserError(f"--src {src} is inside the output {target}: building would replace the source; "
                        f"choose another --out or --name")
    if os.path.lexists(target) and not _is_empty_dir(target) and not overwrite:
        raise UserError(f"{target} already exists; pass --overwrite to replace it "
                        f"(the old one is kept until the new one is complete)")


def _is_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path)


def remove(path: str) -> None:
    """Deletes a file, a link, or a folder with its contents (the unfinished build's hidden folder)."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def move_into_place(partial: str, target: str, overwrite: bool) -> None:
    """Renames the complete `partial` to `target`; an existing one is moved to <target>.old-<date>-<time> first."""
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


def write_dataset(args, name: str, target: str, splits: dict, classes: list, summary: dict,
                  after: dict | None = None) -> dict:
    """Writes `splits` {split: (records, skipped: the list its records fill)} as <split>.lmdb with counts.json
    (`summary`, then the classes and the counts read back, then `after`: each builder keeps its own key order)
    into a hidden folder <out>/.<name>.partial-*, moved to `target` only once complete (an existing one kept
    aside, with --overwrite); returns counts.json's content."""
    partial = os.path.join(args.out, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(partial)
    except OSError as e:
        raise UserError(f"cannot write into --out {args.out}: {outputs.failure(e, args.out)}") from None
    try:
        counts = {}
        for split, (split_records, skipped) in splits.items():
            path = os.path.join(partial, f"{split}.lmdb")
            write_lmdb(path, split_records)
            counts[split] = count(LMDBReader(path).labels(), classes)  # what was written, read back
            counts[split]["skipped"] = skipped
        summary = {**summary, "num_classes": len(classes), "classes": classes, "splits": counts, **(after or {})}
        with open(os.path.join(partial, "counts.json"), "w") as f:
            json.dump(summary, f, indent=1)
        move_into_place(partial, target, args.overwrite)
    except (OSError, lmdb.Error) as e:  # a full disk (lmdb: DiskError), a folder made read-only meanwhile
        raise UserError(f"cannot write {target}: {outputs.failure(e, args.out)}; nothing was changed there") from None
    finally:
        with contextlib.suppress(OSError):
            remove(partial)
    return summary


def report(name: str, target: str, counts: dict, classes: list) -> None:
    """The lines a build prints: what was written, the table of counts, where they are stored, what was skipped."""
    print(f"{name}: wrote {target}/train.lmdb ({counts['train']['total']} images) and "
          f"{target}/test.lmdb ({counts['test']['total']} images), {len(classes)} classes")
    print_counts(counts, classes)
    print(f"counts stored in {os.path.join(target, 'counts.json')}")
    for split in SPLITS:
        if counts[split]["skipped"]:
            print(f"warning: {name} {split}: skipped {len(counts[split]['skipped'])} unreadable images "
                  f"(listed in counts.json)", file=sys.stderr)


def check_space(args, source: Source, target: str) -> None:
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

