"""What a dataset split is, by content: a fingerprint that two copies share and any change of a byte breaks.

    split_fingerprint(dataset)   -> {"format": "lmdb", "records": 5994, "sha256": "<64 hex>"}
    SplitInput(name, split, data_dir).fingerprint()   the same, from the name (what a run record keeps)
                                    {"format": "image folder", "records": 12000, "sha256": ...}
    describe_change(before, now) -> "5994 -> 6000 records", "same number of records (5994), other content", ""

`dataset` is a data.ImageDataset. The digest covers what training reads, and nothing else:
- LMDB (the release's format): every key and value of the file in key order (the records, their labels,
  __keys__ and __len__), not the file's bytes, so an `mdb_copy` or a rebuild from the same images agrees
  and so do copies on other machines;
- an image folder: train/'s class list, then per image its path below the split folder, its label and
  the SHA-256 of its bytes;
- a text split (<split>.jsonl, data/text.py): the label names, then each text and label in file order
  {"format": "jsonl", ...}; the JSON spelling of the file does not enter.
Paths, inodes and modification times do not enter: a dataset moved, copied with `cp -p`, `rsync -a` or an
archive is the same; an image rewritten with its old size and times is not.

Cost: every byte is read once (SHA-256 at ~1.3 GB/s here): a cub-sized LMDB (1.1 GB) about 1.5 s, an image
folder of 12,000 files (1.1 GB) about 2 s, on 2 shared CPU cores with a warm page cache (docs/data.md,
"Fingerprints"). A process remembers each result under the files' (inode, size, times), so the decode-once
cache and the run record pay for one hash, not two; that memo cannot be stale (any rewrite changes the ctime,
which no user can set).
"""
import hashlib
import os

from data.lmdb_format import LMDBReader

_MEMO: dict[tuple, dict] = {}
_CHUNK = 1 << 20


def _stat_key(path: str) -> tuple:
    st = os.stat(path)
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _lmdb_data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def _framed(h, blob) -> None:
    """Length-prefixed, so that no two sequences of blobs hash alike."""
    h.update(len(blob).to_bytes(8, "little"))
    h.update(blob)


def _lmdb_digest(reader: LMDBReader) -> str:
    h = hashlib.sha256(b"lmdb records\n")
    for key, value in reader.raw_records():
        _framed(h, key)
        _framed(h, value)
    return h.hexdigest()


def _file_digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


def _folder_digest(reader) -> str:
    h = hashlib.sha256(b"image folder\n")
    for name in reader.classes:
        _framed(h, name.encode())
    for (path, label), key in zip(reader.items, reader.keys):
        _framed(h, key)
        h.update(int(label).to_bytes(8, "little", signed=True))
        h.update(_file_digest(path))
    return h.hexdigest()


def split_fingerprint(dataset) -> dict:
    """The content fingerprint of one split of a data.ImageDataset (see the module docstring)."""
    return reader_fingerprint(dataset.reader)


def reader_fingerprint(reader) -> dict:
    """The content fingerprint of a split's reader (an LMDBReader or an image-folder reader)."""
    if isinstance(reader, LMDBReader):
        key = ("lmdb", _stat_key(_lmdb_data_file(reader.path)))
        if key not in _MEMO:
            _MEMO[key] = {"format": "lmdb", "records": len(reader), "sha256": _lmdb_digest(reader)}
    else:
        key = ("folder", tuple(reader.classes),
               tuple((k, label, _stat_key(p)) for (p, label), k in zip(reader.items, reader.keys)))
        if key not in _MEMO:
            _MEMO[key] = {"format": "image folder", "records": len(reader), "sha256": _folder_digest(reader)}
    return dict(_MEMO[key])


def describe_change(before: dict, now: dict) -> str:
    """What differs between two split fingerprints, in a few words ('' if nothing)."""
    if before == now:
        return ""
    if before.get("format") != now.get("format"):
        return f"{before.get('format')} -> {now.get('format')}"
    if before.get("records") != now.get("records"):
        return f"{before.get('records')} -> {now.get('records')} records"
    return f"same number of records ({now.get('records')}), other content"


class SplitInput:
    """A dataset split a stage reads, named in its run record (training.Run's `reads`): fingerprinted on demand,
    without decoding an image."""

    def __init__(self, dataset: str, split: str, data_dir: str):
        self.dataset, self.split, self.data_dir = dataset, split, data_dir

    def fingerprint(self) -> dict:
        from data.datasets import check_name, open_split  # data.datasets imports nothing of this module's users
        from data import text
        if text.is_text_dataset(os.path.join(self.data_dir, check_name(self.dataset))):
            path = text.split_path(os.path.join(self.data_dir, self.dataset), self.split)
            counts = os.path.join(self.data_dir, self.dataset, "counts.json")
            key = ("jsonl", _stat_key(path) if os.path.exists(path) else path,
                   _stat_key(counts) if os.path.exists(counts) else counts)
            if key not in _MEMO:
                _MEMO[key] = text.fingerprint(text.TextSplit(self.dataset, self.split, self.data_dir))
            return dict(_MEMO[key])
        return reader_fingerprint(open_split(self.dataset, self.split, self.data_dir)[1])

    change = staticmethod(describe_change)
