"""The release's LMDB format as this repository reads it (data/lmdb_format.py)."""
import os

from data.lmdb_format import LMDBReader, write_lmdb
from data import lmdb_format


def test_a_reader_maps_the_data_not_the_writers_upper_bound(tmp_path):
    """A split opened for reading reserves about its own size of address space, not the 1 TiB upper bound the
    writer stores in the file: a process keeping ~120 splits open would otherwise run out of address space."""
    path = str(tmp_path / "train.lmdb")
    write_lmdb(path, [(os.urandom(2000), k % 3) for k in range(50)])
    reader = LMDBReader(path)
    assert [reader[k][1] for k in range(3)] == [0, 1, 2]
    mapped = lmdb_format._read_env(path).info()["map_size"]
    assert mapped <= 2 * os.path.getsize(path) + (1 << 20), mapped
