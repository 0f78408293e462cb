"""What a weight file or model directory is, by content: θ₀ when it is local (or in the Hugging Face cache), the
teacher, the checkpoint fine-tuning starts from.

    weights_fingerprint(name) -> {"kind": "model directory", "files": {"config.json": "<sha256>",
                                  "model.safetensors": "<sha256>"}, "bytes": 343249332, "sha256": "<sha256>"}
    describe_change(before, now) -> "model.safetensors changed", ""
    WeightsInput(name).fingerprint()   the same, for a run record (training.Run's `reads`)

`name` is anything the stages read weights from: a directory written by save_pretrained (ours, or `hf download
--local-dir`), the release's model.pt (or a directory holding one, as fine-tuning's checkpoint path may be), a
hub id whose files are in the local cache, or vit-mae-tiny. What is hashed is what loading reads:
- a model directory: config.json and the weight files (model*.safetensors, pytorch_model*.bin, their
  *.index.json), not args.json, metrics.jsonl, train_state.pt or preprocessor_config.json (the preprocessing
  is recorded and compared apart, as applied: training.run_dir.changed_preprocessing);
- a release model.pt: the file;
- a hub id: the cached snapshot's files, as a model directory, plus its revision (the commit);
- vit-mae-tiny, roberta-tiny: its state dict as built (the tensors of models.load_mae / load_mlm), so a change of
  its initialisation code changes it.
"sha256" digests the per-file digests with their names. The SHA-256 of a weight file equals the Hub's LFS oid
of that file, so a downloaded copy and the cached original agree. Paths and times never enter.

Cost: every byte read once (ViT-B/16's 330 MB: about 0.5 s; measured in docs/data.md, "Fingerprints"). Results are
remembered per process under each file's (inode, size, times), so reading one checkpoint twice hashes it once.
"""
import fnmatch
import hashlib
import os

import torch

from errors import UserError
from models.checkpoints import RELEASE_CHECKPOINT
from models.hub import TEXT_TINY_NAME, TINY_NAME, looks_like_local_path
from models.roberta_mlm import load_mlm
from models.vit_mae import load_mae

WEIGHT_PATTERNS = ("model*.safetensors", "pytorch_model*.bin", "*.index.json")
_MEMO: dict[tuple, str] = {}


def _file_sha256(path: str) -> str:
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    if key not in _MEMO:
        with open(path, "rb") as f:
            _MEMO[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _MEMO[key]


def _combined(files: dict) -> str:
    h = hashlib.sha256(b"weights\n")
    for name in sorted(files):
        h.update(f"{name} {files[name]}\n".encode())
    return h.hexdigest()


def _fingerprint(kind: str, folder: str, names: list[str], **extra) -> dict:
    files = {name: _file_sha256(os.path.join(folder, name)) for name in names}
    size = sum(os.path.getsize(os.path.join(folder, name)) for name in names)
    return {"kind": kind, "files": files, "bytes": size, "sha256": _combined(files), **extra}


def _model_dir(folder: str, kind: str = "model directory", **extra) -> dict:
    names = sorted(n for n in os.listdir(folder) if any(fnmatch.fnmatch(n, p) for p in WEIGHT_PATTERNS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise UserError(f"'{folder}' holds no weight file (model.safetensors or pytorch_model.bin)")
    return _fingerprint(kind, folder, ["config.json", *names], **extra)


def _tiny(name: str) -> dict:
    h = hashlib.sha256(b"state dict\n")
    state = (load_mae(TINY_NAME) if name == TINY_NAME else load_mlm(TEXT_TINY_NAME)).state_dict()
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        h.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        h.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()
    return {"kind": "built-in", "files": {name: digest}, "bytes": 0, "sha256": _combined({name: digest})}


def _hub_snapshot(name: str) -> str | None:
    """The local snapshot folder of hub id `name`, or None if it is not cached."""
    try:
        from huggingface_hub import snapshot_download
        return snapshot_download(name, local_files_only=True)
    except Exception:  # not cached, not a valid id, huggingface_hub's many error types
        return None


def weights_fingerprint(name: str) -> dict:
    """The content fingerprint of the weights `name` designates (see the module docstring)."""
    if name in (TINY_NAME, TEXT_TINY_NAME):
        return _tiny(name)
    if os.path.isfile(name):  # the release's model.pt (any file name: it is read as one)
        return _fingerprint("release model.pt", os.path.dirname(name) or ".", [os.path.basename(name)])
    if os.path.isdir(name):
        if os.path.isfile(os.path.join(name, "config.json")):
            return _model_dir(name)
        if os.path.isfile(os.path.join(name, RELEASE_CHECKPOINT)):
            return _fingerprint("release model.pt", name, [RELEASE_CHECKPOINT])
        raise UserError(f"'{name}' is neither a model directory (config.json) nor holds a {RELEASE_CHECKPOINT}")
    if not looks_like_local_path(name):
        snapshot = _hub_snapshot(name)
        if snapshot is not None:
            return _model_dir(snapshot, "hub", revision=os.path.basename(os.path.normpath(snapshot)))
        raise UserError(f"'{name}' is not in the local Hugging Face cache: load it first (its fingerprint is "
                        f"taken from the cached files)")
    raise UserError(f"'{name}' does not exist")


def describe_change(before: dict, now: dict) -> str:
    """Which files differ between two weight fingerprints, in a few words ('' if none)."""
    if before.get("sha256") == now.get("sha256"):
        return ""
    if before.get("kind") != now.get("kind"):
        return f"{before.get('kind')} -> {now.get('kind')}"
    old, new = before.get("files", {}), now.get("files", {})
    changed = sorted(n for n in set(old) | set(new) if old.get(n) != new.get(n))
    return ", ".join(f"{n} {'added' if n not in old else 'removed' if n not in new else 'changed'}" for n in changed)


class WeightsInput:
    """Weights a stage reads (θ₀, the teacher, the checkpoint fine-tuning starts from), named in its run record
    (training.Run's `reads`): fingerprinted on demand."""

    def __init__(self, name: str):
        self.name = name

    def fingerprint(self) -> dict:
        return weights_fingerprint(self.name)

    change = staticmethod(describe_change)
