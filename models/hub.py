"""Where a model name leads: `vit-mae-tiny` or `roberta-tiny` (built in code), a local model directory, or a
Hugging Face Hub id (the local cache alone when the Hub is offline or cannot be reached), every failure one line.

    initial_config(name)        θ₀'s architecture without loading its weights (ViT-MAE)
    modality(name)              "image" (ViT-MAE, MAE) or "text" (RoBERTa, MLM): which half of the method a model is for
    _from_pretrained(cls, name, model_type) cls.from_pretrained of a model directory or a hub id
    looks_like_local_path(name) whether `name` is written as a path rather than as a hub id
    _processor_file(name)       the image-processor file of a model directory or a cached hub id, if any

Imports nothing from models/: models.checkpoints (checkpoint I/O), models.vit_mae and models.roberta_mlm (the
method) import it.
"""
import functools
import json
import os
import socket
import urllib.parse

from transformers import ViTMAEConfig
from transformers.utils import logging as hf_logging

from errors import UserError

hf_logging.disable_progress_bar()  # per-file loading bars drown the training log

TINY_NAME = "vit-mae-tiny"
# A small ViT-MAE for CPU tests and the demo: 32x32 images, 4x4 patches (64 tokens + CLS).
TINY_CONFIG = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                   decoder_num_attention_heads=4, decoder_intermediate_size=64)

TEXT_TINY_NAME = "roberta-tiny"
# A small RoBERTa for CPU tests and the text demo, over a byte vocabulary (4 specials + 256 bytes + <mask>).
# 514 positions as roberta-base (512 tokens after the padding offset of 2), so the default max length fits.
# Attention dropout 0: transformers 5 passes it to the attention function (SDPA's dropout_p), not to an
# nn.Dropout module, so it cannot be drawn per (seed, step, sample) as the other dropout is.
TEXT_TINY_CONFIG = dict(vocab_size=261, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=514, type_vocab_size=1,
                        attention_probs_dropout_prob=0.0)

# The model types each half of the method reads, by modality; the name each is called in messages.
MODALITIES = {"vit_mae": "image", "vit": "image", "roberta": "text"}
MODEL_TYPE_NAMES = {"vit_mae": "a ViT-MAE model (model_type vit_mae)",
                    "roberta": "a RoBERTa model (model_type roberta)"}
TINY_OF_MODEL_TYPE = {"vit_mae": TINY_NAME, "roberta": TEXT_TINY_NAME}

WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
PROCESSOR_FILE = "preprocessor_config.json"


def initial_config(model_name: str) -> ViTMAEConfig:
    """θ₀'s architecture without loading its weights."""
    if model_name == TINY_NAME:
        return ViTMAEConfig(**TINY_CONFIG)
    return _from_pretrained(ViTMAEConfig, model_name)


def modality(model_name: str) -> str:
    """"image" or "text": the half of the method a model name or directory is for (read from its config.json)."""
    if model_name in (TINY_NAME, TEXT_TINY_NAME):
        return "image" if model_name == TINY_NAME else "text"
    if os.path.isdir(model_name):
        model_type = _model_dir_type(model_name)
    else:
        from transformers import AutoConfig
        model_type = _from_pretrained(AutoConfig, model_name, model_type=None).model_type
    if model_type not in MODALITIES:
        raise UserError(f"'{model_name}' is a '{model_type}' model; the method runs on "
                        f"{' or '.join(MODEL_TYPE_NAMES.values())}")
    return MODALITIES[model_type]


def _from_pretrained(cls, name: str, model_type: str | None = "vit_mae"):
    """cls.from_pretrained of a local model directory or a hub id, every failure one line. A directory must
    hold a `model_type` model (None: any)."""
    if os.path.isdir(name):
        found = _model_dir_type(name)
        if model_type is not None and found != model_type:
            raise UserError(f"'{name}' holds a '{found}' model; {MODEL_TYPE_NAMES[model_type]} is needed")
        return _load_dir(cls, name)
    if os.path.exists(name):
        tiny = TINY_OF_MODEL_TYPE.get(model_type, f"{TINY_NAME} / {TEXT_TINY_NAME}")
        raise UserError(f"'{name}' is a file; pass a model directory, a hub id or {tiny}")
    if looks_like_local_path(name):
        raise UserError(f"'{name}' does not exist (a local model directory was expected; a hub id has the form "
                        f"owner/name)")
    offline = _hub_offline_reason()
    try:
        return cls.from_pretrained(name, local_files_only=offline is not None)
    except OSError as e:
        parent, base = os.path.split(name)
        if os.path.isdir(parent):  # `runs/x` next to a local runs/: a mistyped path far more likely than a hub id
            raise UserError(f"'{name}' does not exist: the local directory {parent}/ has no '{base}' (nor is it a "
                            f"hub model {'in the cache' if offline else 'that could be loaded'})") from None
        fetch = f"on a machine with access run `hf download {name} --local-dir DIR`, then pass --model_name DIR"
        if offline is not None:
            raise UserError(f"'{name}' is neither a local directory nor in the Hugging Face cache, and {offline}; "
                            f"{fetch}") from None
        raise UserError(f"cannot load '{name}' from the Hugging Face Hub ({str(e).splitlines()[0]}); "
                        f"{fetch}") from None


def looks_like_local_path(name: str) -> bool:
    """A hub id is `owner/name` (or a bare name); anything written as a path is a path."""
    return (name.startswith(("./", "../", "/", "~")) or name.endswith(("/", os.sep)) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def _hub_offline_reason() -> str | None:
    """Why the Hub cannot be asked (None: it can). huggingface_hub retries an unreachable Hub for ~25 s
    per file before failing, so an unreachable endpoint is detected once, up front, and the cache used alone."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return f"the Hub is offline here ({var}={os.environ[var]})"
    return _endpoint_unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=None)
def _endpoint_unreachable(endpoint: str) -> str | None:
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # only the proxy knows; let huggingface_hub try
    url = urllib.parse.urlsplit(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=5).close()
        return None
    except OSError as e:
        return f"the Hub ({host}:{port}) cannot be reached: {e}"


def _model_dir_type(path: str) -> str | None:
    """The model_type of a directory written by save_pretrained, after checking it has its two files."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise UserError(f"'{path}' is not a model directory: it has no config.json")
    if not any(os.path.isfile(os.path.join(path, f)) for f in WEIGHTS_FILES):
        raise UserError(f"'{path}' has config.json but no model.safetensors (an interrupted save? write it again)")
    try:
        with open(config_path) as f:
            return json.load(f).get("model_type")
    except OSError as e:  # unreadable (permissions), an I/O error
        raise UserError(f"cannot read {config_path}: {e.strerror or e}") from None
    except (ValueError, AttributeError) as e:
        raise UserError(f"cannot read {config_path}: not a JSON object ({e})") from None


def _load_dir(cls, path: str):
    weights = next(os.path.join(path, f) for f in WEIGHTS_FILES if os.path.isfile(os.path.join(path, f)))
    try:
        return cls.from_pretrained(path)
    except Exception as e:  # a truncated or empty file: safetensors, pickle and JSON errors have no common base
        raise UserError(f"cannot read the model in {weights} ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0] if str(e).strip() else 'empty'})") from None


def _processor_file(name: str) -> str | None:
    if name == TINY_NAME:
        return None
    if os.path.isdir(name):
        path = os.path.join(name, PROCESSOR_FILE)
        return path if os.path.isfile(path) else None
    if os.path.exists(name) or looks_like_local_path(name) or name.count("/") != 1:  # a file (model.pt), no hub id
        return None
    try:  # a hub id: the file sits in the local cache next to the weights once downloaded
        from huggingface_hub import hf_hub_download
        return hf_hub_download(name, PROCESSOR_FILE, local_files_only=_hub_offline_reason() is not None)
    except Exception:  # offline, not cached, or the repository has no such file
        return None
