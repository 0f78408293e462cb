"""`python -m data.prepare --check NAME`: every record of an existing dataset folder read back and decoded,
labels and counts checked, and test records that are byte-for-byte copies of train records refused."""
import hashlib
import os
import sys

from tqdm import tqdm

from data.build import count, decode, ordered_map, print_counts, warn_expected
from data.datasets import DATASETS, SPLITS, check_name, how_to_rebuild, read_counts, split_reader
from data.lmdb_format import LMDBReader
from errors import UserError

MAX_LISTED_PROBLEMS = 20
MAX_LISTED_COPIES = 3  # examples in --check's line about records that are copies of others


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
        decode(image_bytes)
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
        examined = ordered_map(lambda record: (record, _examine(record)), _read_records(reader, root, problems),
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
    counts = {split: count(split_labels, classes) for split, split_labels in labels.items()}
    if stored and isinstance(stored.get("splits"), dict):  # other writers' counts.json may have no splits
        for split in counts:
            want = stored["splits"].get(split) or {}
            if (want.get("total"), want.get("per_class")) != (counts[split]["total"], counts[split]["per_class"]):
                problems.append(f"{root} {split}: counts differ from counts.json "
                                f"({counts[split]['total']} images, counts.json says {want.get('total')})")

    print_counts(counts, classes)
    warn_expected((stored or {}).get("dataset", name), name, counts)
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

