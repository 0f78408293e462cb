"""Content fingerprints of what a run reads (data.identity for dataset splits, models.identity for weights):
equal for copies wherever they lie, different after any change of what training would read."""
import io
import os
import shutil

import pytest
import torch
from PIL import Image

from data import ImageDataset, LMDBReader, write_lmdb
from data.identity import describe_change, split_fingerprint


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n=2):
    for split in ("train", "test"):
        for label, cls in enumerate(("a", "b")):
            os.makedirs(root / split / cls, exist_ok=True)
            for i in range(n):
                (root / split / cls / f"{i}.png").write_bytes(_png((40 * i, 100 * label, 7)))


def _fp(data_dir, name="mine", split="train"):
    return split_fingerprint(ImageDataset(name, split, str(data_dir), 8))


def test_an_image_folder_fingerprint_follows_the_bytes_not_the_files(tmp_path):
    _folder(tmp_path / "d" / "mine")
    first = _fp(tmp_path / "d")
    assert first["format"] == "image folder" and first["records"] == 4 and len(first["sha256"]) == 64
    assert _fp(tmp_path / "d") == first
    shutil.copytree(tmp_path / "d" / "mine", tmp_path / "e" / "other")  # a copy elsewhere, new inodes and times
    assert _fp(tmp_path / "e", "other") == first
    assert _fp(tmp_path / "d", split="test") == first  # the same images in the same places

    image = tmp_path / "d" / "mine" / "train" / "a" / "1.png"
    st = os.stat(image)
    image.write_bytes(_png((41, 0, 7)))  # one pixel value, the old times put back
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _fp(tmp_path / "d")
    assert changed["sha256"] != first["sha256"]
    assert describe_change(first, changed) == "same number of records (4), other content"

    _png_path = tmp_path / "e" / "other" / "train" / "b" / "2.png"
    _png_path.write_bytes(_png((0, 0, 0)))  # an image added
    assert describe_change(first, _fp(tmp_path / "e", "other")) == "4 -> 5 records"
    os.rename(tmp_path / "e" / "other" / "train" / "b", tmp_path / "e" / "other" / "train" / "c")  # renamed class
    _png_path = tmp_path / "e" / "other" / "train" / "c" / "2.png"
    os.remove(_png_path)
    renamed = _fp(tmp_path / "e", "other")
    assert renamed["records"] == 4 and renamed["sha256"] != first["sha256"]


def test_an_lmdb_fingerprint_follows_the_records_not_the_file(data_dir, tmp_path):
    reader = LMDBReader(os.path.join(data_dir, "digits", "train.lmdb"))
    records = [reader[i] for i in range(40)]
    write_lmdb(str(tmp_path / "a" / "mine" / "train.lmdb"), records)
    write_lmdb(str(tmp_path / "b" / "mine" / "train.lmdb"), records)  # rebuilt from the same records
    first = _fp(tmp_path / "a")
    assert first["format"] == "lmdb" and first["records"] == 40
    assert _fp(tmp_path / "b") == first
    write_lmdb(str(tmp_path / "c" / "mine" / "train.lmdb"), [(img, (label + 1) % 10) for img, label in records])
    relabelled = _fp(tmp_path / "c")
    assert relabelled["sha256"] != first["sha256"] and relabelled["records"] == 40
    assert _fp(data_dir, "digits")["records"] == 1297


def test_the_memo_is_keyed_by_the_files_state(tmp_path, monkeypatch):
    """A process hashes a split once (the cache and the run record both ask) until a file changes."""
    import data.identity as identity
    _folder(tmp_path / "d" / "mine")
    calls = []
    real = identity._file_digest
    monkeypatch.setattr(identity, "_file_digest", lambda path: calls.append(path) or real(path))
    first = _fp(tmp_path / "d")
    assert len(calls) == 4
    assert _fp(tmp_path / "d") == first and len(calls) == 4
    (tmp_path / "d" / "mine" / "train" / "a" / "0.png").write_bytes(_png((1, 2, 3)))
    assert _fp(tmp_path / "d") != first and len(calls) == 8


# ----------------------------------------------------------------------------- weights

def test_a_model_directory_fingerprint_follows_its_weights_and_config(tmp_path):
    from models import load_mae, save_model
    from models.identity import describe_change as weights_change, weights_fingerprint
    mae = load_mae("vit-mae-tiny")
    save_model(mae, str(tmp_path / "a"))
    first = weights_fingerprint(str(tmp_path / "a"))
    assert first["kind"] == "model directory" and set(first["files"]) == {"config.json", "model.safetensors"}
    assert first["bytes"] == sum(os.path.getsize(tmp_path / "a" / f) for f in first["files"])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "b" / "args.json").write_text("{}")  # a run record beside the weights does not count
    (tmp_path / "b" / "preprocessor_config.json").write_text("{}")
    assert weights_fingerprint(str(tmp_path / "b")) == first
    with torch.no_grad():
        mae.vit.embeddings.cls_token.add_(1e-3)  # a re-trained teacher
    save_model(mae, str(tmp_path / "b"))
    changed = weights_fingerprint(str(tmp_path / "b"))
    assert changed["sha256"] != first["sha256"]
    assert weights_change(first, changed) == "model.safetensors changed"
    # the SHA-256 of the weight file is the file's, as the Hub's LFS oid is
    import hashlib
    assert first["files"]["model.safetensors"] == hashlib.sha256((tmp_path / "a" / "model.safetensors")
                                                                 .read_bytes()).hexdigest()


def test_release_files_and_the_built_in_model(tmp_path):
    from models.identity import weights_fingerprint
    blob = {"args": None, "state_dict": {"w": torch.ones(3)}}
    torch.save(blob, tmp_path / "model.pt")
    os.makedirs(tmp_path / "ckpt" / "cub")
    shutil.copy(tmp_path / "model.pt", tmp_path / "ckpt" / "cub" / "model.pt")
    by_file = weights_fingerprint(str(tmp_path / "model.pt"))
    by_dir = weights_fingerprint(str(tmp_path / "ckpt" / "cub"))
    assert by_file == by_dir and by_file["kind"] == "release model.pt"
    tiny = weights_fingerprint("vit-mae-tiny")
    assert tiny["kind"] == "built-in" and weights_fingerprint("vit-mae-tiny") == tiny
    with pytest.raises(Exception, match="not in the local Hugging Face cache"):
        weights_fingerprint("nobody/not-a-model-anywhere")
    with pytest.raises(Exception, match="does not exist"):
        weights_fingerprint(str(tmp_path / "nowhere") + "/")


def test_a_hub_id_is_fingerprinted_from_its_cached_snapshot_as_a_downloaded_copy_is(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from models import load_mae, save_model
    from models.identity import weights_fingerprint
    save_model(load_mae("vit-mae-tiny"), str(tmp_path / "download"))  # what `hf download --local-dir` gives
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--owner--tiny"
    os.makedirs(repo / "refs")
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision
    os.makedirs(snapshot)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tmp_path / "download" / name, snapshot / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = weights_fingerprint("owner/tiny")
    local = weights_fingerprint(str(tmp_path / "download"))
    assert hub["kind"] == "hub" and hub["revision"] == revision
    assert hub["sha256"] == local["sha256"] and hub["files"] == local["files"]
