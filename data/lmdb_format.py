"""The LMDB layout of the authors' release (docs/data.md), read and written.

One LMDB file per split (`data/<name>/train.lmdb`, `data/<name>/test.lmdb`):
    b'__len__'  -> pickle(int)              number of records
    b'__keys__' -> pickle(list[bytes])      the record keys, in order
    key         -> pickle((bytes, int))     encoded image file (JPEG/PNG) and its label

Records are unpickled with a restricted unpickler that refuses every class, so a
hostile file cannot run code: the format only ever holds ints, bytes, lists and tuples.
"""
import io
import os
import pickle
import shutil
import stat

import lmdb

LEN_KEY = b"__len__"
KEYS_KEY = b"__keys__"
_MAP_SIZE = 1 << 40  # an upper bound only; the file grows with what is written
_COMMIT_BYTES = 64 << 20


class _PlainDataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: records hold only bytes and ints")


def plain_loads(blob: bytes):
    """pickle.loads for plain data (ints, bytes, str, lists, tuples); refuses any class."""
    return _PlainDataUnpickler(io.BytesIO(blob)).load()


_READ_ENVS: dict[tuple, tuple[int, lmdb.Environment]] = {}  # file identity -> (pid, env)


def _read_env(path: str) -> lmdb.Environment:
    """A read-only environment shared by every reader of `path` in this process.

    LMDB refuses a second open of the same file in one process, and an environment must not be used
    across fork() (DataLoader workers): a child closes the one it inherited and opens its own."""
    # keyed by the data file's identity, not its path: a build reads its split back, then renames it
    data_file = os.path.join(path, "data.mdb") if os.path.isdir(path) else path
    st = os.stat(data_file)
    if not stat.S_ISREG(st.st_mode):  # lmdb would open a FIFO and wait for a writer for ever
        raise ValueError(f"{data_file} is not a regular file ({file_kind(st.st_mode)})")
    key = (st.st_dev, st.st_ino)
    pid, env = _READ_ENVS.get(key, (None, None))
    if env is not None and pid != os.getpid():
        env.close()
        env = None
    if env is None:
        env = _open(path, readonly=True)
        try:
            _check_size(data_file, env)
        except ValueError:
            env.close()
            raise
        _READ_ENVS[key] = (os.getpid(), env)
    return env


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words, for the errors that refuse it (an os.stat st_mode)."""
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _check_size(data_file: str, env: lmdb.Environment) -> None:
    """Refuses a file shorter than its header says (an interrupted copy or extraction): reading a page past
    the end of a memory-mapped file kills the process with SIGBUS, with no message. Only the two meta pages
    are read here, and a successful open guarantees both lie inside the file."""
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = os.path.getsize(data_file)
    if size < needed:
        raise ValueError(f"the file is truncated: {size:,} bytes, but its LMDB header says {needed:,} "
                         f"(an interrupted copy, download or extraction?)")


def _open(path: str, readonly: bool) -> lmdb.Environment:
    # The release's files are single files (subdir=False); a directory-style LMDB also opens. No lock file: a
    # reader never writes, and the one writer (write_lmdb) writes a private .partial file. LMDB memory-maps its
    # lock file, and touching that map on a full disk kills the process with SIGBUS, without a message.
    # A reader asks for a 1-byte map, which LMDB raises to the data's size: with 0 it would take the writer's
    # _MAP_SIZE stored in the file, 1 TiB of address space per open split, and a process that keeps ~120 splits
    # open (the test suite; a long session) runs out of its 128 TiB ("Cannot allocate memory").
    return lmdb.open(path, subdir=os.path.isdir(path), readonly=readonly, lock=False,
                     readahead=False, meminit=False, map_size=_MAP_SIZE if not readonly else 1)


class LMDBReader:
    """Random access to the records of one split; safe to send to DataLoader workers."""

    def __init__(self, path: str):
        self.path = path
        with _read_env(path).begin() as txn:
            keys_blob = txn.get(KEYS_KEY)
            len_blob = txn.get(LEN_KEY)
        if keys_blob is None or len_blob is None:
            raise ValueError(f"{path} is not in the release's LMDB format (no __keys__ / __len__ entries)")
        self.keys = plain_loads(keys_blob)
        if plain_loads(len_blob) != len(self.keys):
            raise ValueError(f"{path}: __len__ disagrees with the number of __keys__")
        self._labels = None

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        """Returns (encoded image bytes, label). Raises KeyError/ValueError on a damaged record."""
        key = self.keys[index]
        with _read_env(self.path).begin() as txn:
            blob = txn.get(key)
        if blob is None:
            raise KeyError(key)
        image_bytes, label = plain_loads(blob)
        return image_bytes, int(label)

    def raw_records(self):
        """Every (key, value) pair of the file in key order, the __keys__ and __len__ entries among them, as
        buffers valid until the next pair (read without copying: for content fingerprints)."""
        with _read_env(self.path).begin(buffers=True) as txn:
            yield from txn.cursor()

    def labels(self) -> list[int]:
        """Every record's label (reads every record once, then remembered)."""
        if self._labels is None:
            self._labels = [self[i][1] for i in range(len(self))]
        return self._labels


def record_key(index: int) -> bytes:
    return f"{index:08d}".encode()


def write_lmdb(path: str, records) -> int:
    """Write an iterable of (image_bytes, label) to `path` in the release's format; returns the count.

    Atomic: the records go to `<path>.partial` first, which is renamed to `path` only once
    complete, so an interrupted build never leaves a file that looks finished. Refuses to
    replace an existing `path`; the caller decides about overwriting.
    """
    if os.path.exists(path):
        raise FileExistsError(path)
    partial = path + ".partial"
    for stale in (partial, partial + "-lock"):
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.remove(stale)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    env = _open(partial, readonly=False)
    keys, pending_bytes = [], 0
    txn = env.begin(write=True)
    try:
        for index, (image_bytes, label) in enumerate(records):
            key = record_key(index)
            blob = pickle.dumps((bytes(image_bytes), int(label)), protocol=4)
            txn.put(key, blob)
            keys.append(key)
            pending_bytes += len(blob)
            if pending_bytes > _COMMIT_BYTES:  # bounded transaction size, whatever the image sizes
                txn.commit()
                txn, pending_bytes = env.begin(write=True), 0
        txn.put(KEYS_KEY, pickle.dumps(keys, protocol=4))
        txn.put(LEN_KEY, pickle.dumps(len(keys), protocol=4))
        txn.commit()
        env.sync()
    except BaseException:
        txn.abort()
        raise
    finally:
        env.close()
    if os.path.exists(partial + "-lock"):
        os.remove(partial + "-lock")
    os.replace(partial, path)
    return len(keys)
