"""The ViT-MAE pieces the method needs, by name, on top of Hugging Face `transformers`.

    load_mae(name)              the initial MAE model θ₀ (encoder + decoder): hub id, local dir, or `vit-mae-tiny`;
                                its two fixed sin-cos position tables frozen, as in MAE and the release
    preprocessing_of(name)      the image preprocessing θ₀ (or a checkpoint) was trained with
    mae_loss(mae, x, noise)     MAE reconstruction loss on the masked image
    cls_feature(encoder, x)     CLS token of the last layer after the final LayerNorm, on the *unmasked* image:
                                the representation h(x) that self-distillation matches
    load_encoder(path, name)    the encoder of a checkpoint (the frozen teacher)
    build_classifier(...)       ViTForImageClassification whose encoder comes from θ₀ or a checkpoint
    save_model(model, dir)      a directory stock `from_pretrained` opens (config.json + model.safetensors),
                                with its model card (outputs/card.py) when given one

Checkpoints written by the authors' release (`model.pt`, a pickled {"args", "state_dict"} of the
encoder with transformers-4.x parameter names) are read wherever a checkpoint is read.
"""
import argparse
import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import socket
import urllib.parse

import numpy as np
import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel
from transformers.utils import logging as hf_logging

import outputs
from errors import RunFailed, UserError

hf_logging.disable_progress_bar()  # per-file loading bars drown the training log

TINY_NAME = "vit-mae-tiny"
# A small ViT-MAE for CPU tests and the demo: 32x32 images, 4x4 patches (64 tokens + CLS).
TINY_CONFIG = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=128, decoder_hidden_size=32, decoder_num_hidden_layers=2,
                   decoder_num_attention_heads=4, decoder_intermediate_size=64)
TINY_INIT_SEED = 0  # vit-mae-tiny's θ₀ is this seed's initialisation, the same in every stage and run

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
RELEASE_CHECKPOINT = "model.pt"  # the authors' release
PROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"  # the model card (outputs/card.py)


# ----------------------------------------------------------------------------- loading θ₀

# The fixed 2-D sin-cos position tables of MAE: never trained (MAE, and the release on transformers 4.17,
# keep them frozen; transformers 5 returns them trainable, so we freeze them after every load).
SINCOS_TABLES = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")


def load_mae(model_name: str, mask_ratio: float = 0.75, norm_pix_loss: bool = True) -> ViTMAEForPreTraining:
    """θ₀ as a ViTMAEForPreTraining (encoder + decoder) with the recipe's masking settings and its
    sin-cos position tables frozen (left out of the optimizer)."""
    if model_name == TINY_NAME:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(TINY_INIT_SEED)
            model = ViTMAEForPreTraining(ViTMAEConfig(**TINY_CONFIG))
            mae_initialize(model)
    else:
        model = _from_pretrained(ViTMAEForPreTraining, model_name)
    freeze_sincos_tables(model)
    check_mask_ratio(mask_ratio, model.config)
    # transformers reads both from the config at call time
    model.config.mask_ratio = mask_ratio
    model.config.norm_pix_loss = norm_pix_loss
    return model


def check_mask_ratio(mask_ratio: float, config: ViTMAEConfig) -> None:
    """transformers keeps int(N · (1 - mask_ratio)) of the N patches visible: with none hidden the MAE loss
    is 0/0, with none visible the encoder sees nothing; both end as a NaN loss many steps later."""
    num_patches = (config.image_size // config.patch_size) ** 2
    visible = int(num_patches * (1 - mask_ratio))
    if not 1 <= visible < num_patches:
        raise UserError(f"--mask_ratio {mask_ratio} leaves {visible} of the model's {num_patches} patches visible; "
                        f"at least one must be hidden and one visible")


def freeze_sincos_tables(mae: ViTMAEForPreTraining) -> None:
    for name in SINCOS_TABLES:
        mae.get_parameter(name).requires_grad_(False)


def sincos_2d_table(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed position table (1, 1 + grid², dim): a zero row for CLS, then for each patch (row-major)
    sin/cos of its row coordinate in the first dim/2 channels and of its column in the last dim/2
    (MAE's get_2d_sincos_pos_embed, computed in float64 as numpy does there, stored as float32)."""
    def one_axis(positions: np.ndarray, d: int) -> np.ndarray:  # (M,) -> (M, d)
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.einsum("m,d->md", positions, omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    grid_w, grid_h = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64))
    # MAE stacks (w, h) and encodes grid[0] first: the first half of the channels follows the column index
    table = np.concatenate([one_axis(grid_w.reshape(-1), dim // 2), one_axis(grid_h.reshape(-1), dim // 2)], axis=1)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


@torch.no_grad()
def mae_initialize(mae: ViTMAEForPreTraining) -> None:
    """MAE's initialize_weights, for a model built from a config (vit-mae-tiny): the fixed sin-cos tables,
    the patch projection Xavier-uniform on its flattened (D, C·p·p) weight, cls and mask tokens
    N(0, 0.02), every Linear Xavier-uniform with zero bias, every LayerNorm weight 1 and bias 0.
    Draws from the global generator (the caller seeds it)."""
    config = mae.config
    grid = config.image_size // config.patch_size
    mae.vit.embeddings.position_embeddings.copy_(sincos_2d_table(config.hidden_size, grid))
    mae.decoder.decoder_pos_embed.copy_(sincos_2d_table(config.decoder_hidden_size, grid))
    projection = mae.vit.embeddings.patch_embeddings.projection.weight
    nn.init.xavier_uniform_(projection.view(projection.shape[0], -1))
    nn.init.normal_(mae.vit.embeddings.cls_token, std=0.02)
    nn.init.normal_(mae.decoder.mask_token, std=0.02)
    for module in mae.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def initial_config(model_name: str) -> ViTMAEConfig:
    """θ₀'s architecture without loading its weights."""
    if model_name == TINY_NAME:
        return ViTMAEConfig(**TINY_CONFIG)
    return _from_pretrained(ViTMAEConfig, model_name)


def _from_pretrained(cls, name: str):
    """cls.from_pretrained of a local model directory or a hub id, every failure one line."""
    if os.path.isdir(name):
        model_type = _model_dir_type(name)
        if model_type != "vit_mae":
            raise UserError(f"'{name}' holds a '{model_type}' model; a ViT-MAE model (model_type vit_mae) is needed")
        return _load_dir(cls, name)
    if os.path.exists(name):
        raise UserError(f"'{name}' is a file; pass a model directory, a hub id or {TINY_NAME}")
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


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input: resize to size x size (aspect ratio not kept) with the PIL
    filter `resample`, scale to [0, 1], normalise with mean/std. `source`: the file it was read from."""
    size: int | None = None  # None: the model's image_size
    resample: int = 2  # PIL.Image.BILINEAR, transformers 4.17's default (the release's)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    source: str = "default (no preprocessor_config.json)"

    def check(self, image_size: int) -> "Preprocessing":
        if self.size is not None and self.size != image_size:
            raise UserError(f"{self.source} resizes to {self.size} px but the model takes {image_size} px images")
        return dataclasses.replace(self, size=image_size)


def preprocessing_of(*names: str) -> Preprocessing:
    """The preprocessing in the image-processor file of the first of `names` (model directories, hub ids)
    that has one, as the release used θ₀'s processor; bilinear and ImageNet's mean/std otherwise."""
    for name in names:
        path = _processor_file(name)
        if path is None:
            continue
        try:
            with open(path) as f:
                cfg = json.load(f)
            size = cfg.get("size")
            if isinstance(size, dict):
                size = size.get("height", size.get("shortest_edge"))
            pre = Preprocessing(size=int(size) if size else None, resample=int(cfg.get("resample", 2)),
                                mean=tuple(float(v) for v in cfg.get("image_mean", IMAGENET_MEAN)),
                                std=tuple(float(v) for v in cfg.get("image_std", IMAGENET_STD)), source=path)
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise UserError(f"cannot read the image preprocessing in {path} ({type(e).__name__}: {e}); "
                            f"fix or delete the file") from None
        if len(pre.mean) != 3 or len(pre.std) != 3 or pre.resample not in range(6):
            raise UserError(f"{path}: image_mean and image_std need 3 values and resample a PIL filter (0-5)")
        return pre
    return Preprocessing()


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


# ----------------------------------------------------------------------------- the two representations

def mae_loss(mae: nn.Module, pixel_values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MAE loss: mean squared error on the masked patches (per-patch normalised targets if norm_pix_loss).

    pixel_values: (B, 3, H, W) normalised; noise: (B, N) in [0, 1), the patches with the smallest
    noise are kept (fraction 1 - mask_ratio)."""
    return mae(pixel_values, noise=noise).loss


@contextlib.contextmanager
def _no_masking(config):
    saved = config.mask_ratio
    config.mask_ratio = 0.0
    try:
        yield
    finally:
        config.mask_ratio = saved


def cls_feature(encoder: ViTMAEModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """h(x): the CLS token of the last encoder layer after the final LayerNorm, all patches visible.

    (B, 3, H, W) -> (B, D). Runs the library's own encoder forward with masking turned off and an
    increasing `noise`, so the patches keep their order (no shuffle, nothing dropped)."""
    batch, num_patches = pixel_values.shape[0], encoder.embeddings.patch_embeddings.num_patches
    in_order = torch.arange(num_patches, device=pixel_values.device, dtype=torch.float32).expand(batch, -1)
    with _no_masking(encoder.config):
        hidden = encoder(pixel_values, noise=in_order).last_hidden_state  # (B, 1+N, D)
    return hidden[:, 0]


class MAEWithFeature(nn.Module):
    """The self-distillation student: one forward gives the MAE loss on the masked image and h(x) on
    the unmasked one, so a single backward pass (and a single DDP synchronisation) covers both terms."""

    def __init__(self, mae: ViTMAEForPreTraining):
        super().__init__()
        self.mae = mae

    def forward(self, pixel_values, noise):
        return mae_loss(self.mae, pixel_values, noise), cls_feature(self.mae.vit, pixel_values)


# ----------------------------------------------------------------------------- checkpoints

# transformers 4.x (the authors' release) -> 5.x parameter names
_V4_RENAMES = [
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
    (r"^encoder\.layer\.", "layers."),
]


def rename_v4_keys(state_dict: dict) -> dict:
    """Encoder state dict with transformers-4.x names (or a `vit.`/`module.` prefix) -> 5.x names."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "vit."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        for pattern, new in _V4_RENAMES:
            key = re.sub(pattern, new, key)
        out[key] = value
    return out


def read_release_checkpoint(path: str) -> dict:
    """The authors' `model.pt`: {"args": argparse.Namespace, "state_dict": ...}. torch ≥ 2.6 refuses the
    Namespace under weights_only=True, so it is allow-listed; nothing else is unpickled."""
    expected = "the release's model.pt, a {'args', 'state_dict'} of encoder tensors"
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # garbage, truncated, or pickles more than tensors: no common base class
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else "empty or truncated"
        raise UserError(f"cannot read {path} ({type(e).__name__}: {reason}); expected {expected}") from None
    state = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
    if not (isinstance(state, dict) and state and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items())):
        raise UserError(f"{path} holds no state dict of tensors; expected {expected}")
    return {k: v for k, v in rename_v4_keys(state).items() if not k.startswith("decoder.")}


def _checkpoint_files(path: str) -> tuple[str | None, str | None]:
    """(model directory, release model.pt) for a checkpoint path; both None if there is none."""
    if os.path.isfile(path):  # read as the release's format; read_release_checkpoint names a wrong file
        if os.path.basename(path) in (*WEIGHTS_FILES, "config.json"):
            raise UserError(f"{path} is one file of a model directory; pass the directory "
                            f"{os.path.dirname(path) or '.'}")
        return None, path
    if os.path.isfile(os.path.join(path, "config.json")):
        return path, None
    if os.path.isfile(os.path.join(path, RELEASE_CHECKPOINT)):
        return None, os.path.join(path, RELEASE_CHECKPOINT)
    return None, None


def has_checkpoint(path: str) -> bool:
    return any(_checkpoint_files(path))


def load_encoder_state(path: str, model_name: str) -> tuple[ViTMAEConfig, dict]:
    """(config, encoder state dict with 5.x names, no prefix) of a checkpoint.

    A model directory carries its own config; a release `model.pt` has the architecture of
    `model_name` (the θ₀ it was trained from)."""
    model_dir, release_pt = _checkpoint_files(path)
    if release_pt is not None:
        return initial_config(model_name), read_release_checkpoint(release_pt)
    if model_dir is None:
        raise UserError(f"checkpoint not found: {path} (neither a model directory with config.json nor a "
                        f"{RELEASE_CHECKPOINT})")
    model_type = _model_dir_type(model_dir)
    if model_type == "vit_mae":
        mae = _load_dir(ViTMAEForPreTraining, model_dir)
        return mae.config, mae.vit.state_dict()
    if model_type == "vit":  # a fine-tuned classifier
        clf = _load_dir(ViTForImageClassification, model_dir)
        return mae_config_of(clf.config), clf.vit.state_dict()
    raise UserError(f"checkpoint '{path}' holds a '{model_type}' model, not a ViT / ViT-MAE")


def mae_config_of(vit_config: ViTConfig) -> ViTMAEConfig:
    return ViTMAEConfig(**{k: getattr(vit_config, k) for k in _SHARED_ARCH})


_SHARED_ARCH = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias")


def _load_exact(module: nn.Module, state: dict, what: str, allowed_missing=()) -> None:
    """load_state_dict that names an architecture mismatch in one line and asserts the missing keys."""
    own = module.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = sorted(set(own) - set(state) - set(allowed_missing))
    unexpected = sorted(set(state) - set(own))
    if wrong or missing or unexpected:
        detail = (f"shape of {wrong[0]}: {tuple(state[wrong[0]].shape)} vs {tuple(own[wrong[0]].shape)}" if wrong
                  else f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}")
        raise UserError(f"{what} does not match the model's architecture ({detail})")
    result = module.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == sorted(allowed_missing) and not result.unexpected_keys, result


def check_same_architecture(config: ViTMAEConfig, reference: ViTMAEConfig, what: str) -> None:
    for key in _SHARED_ARCH:
        if getattr(config, key) != getattr(reference, key):
            raise UserError(f"{what} does not match the model's architecture "
                            f"({key}: {getattr(config, key)} vs {getattr(reference, key)})")


def load_encoder(path: str, model_name: str, reference: ViTMAEConfig) -> ViTMAEModel:
    """The encoder of a checkpoint as a ViTMAEModel (the frozen teacher), checked against `reference`."""
    config, state = load_encoder_state(path, model_name)
    check_same_architecture(config, reference, f"checkpoint '{path}'")
    encoder = ViTMAEModel(config)
    _load_exact(encoder, state, f"checkpoint '{path}'")
    return encoder


def build_classifier(config: ViTMAEConfig, encoder_state: dict, num_classes: int, dropout: float
                     ) -> ViTForImageClassification:
    """A ViT classifier (linear head on the final-LayerNorm CLS token) whose encoder is `encoder_state`.

    Every encoder tensor comes from `encoder_state`; only `classifier.weight/bias` are new."""
    vit_config = ViTConfig(**{k: getattr(config, k) for k in _SHARED_ARCH}, num_labels=num_classes,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    model = ViTForImageClassification(vit_config)
    _load_exact(model, {"vit." + k: v for k, v in encoder_state.items()}, "the encoder checkpoint",
                allowed_missing=("classifier.weight", "classifier.bias"))
    return model


def save_model(model: nn.Module, out_dir: str, preprocessing: Preprocessing = Preprocessing(),
               card: str | None = None) -> None:
    """config.json + model.safetensors, readable by stock `from_pretrained`, the preprocessing the
    model was trained with (a ViTImageProcessor file: resize, rescale to [0, 1], normalise), and the
    model card `card` (README.md, outputs.card.model_card) when given.

    Written into a temporary folder first and moved in weights-last, so `model.safetensors` exists
    only once the whole checkpoint, card included, is there (the stages use it as their "done" marker)."""
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(model, tmp, preprocessing, card)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(f"cannot write the model into {out_dir}: {outputs.failure(e, out_dir)}") from None
    names = sorted(os.listdir(tmp), key=lambda n: n.endswith(".safetensors"))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def _write_model(model: nn.Module, tmp: str, preprocessing: Preprocessing, card: str | None) -> None:
    model.save_pretrained(tmp)
    if card is not None:
        with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(card)
    size = model.config.image_size
    with open(os.path.join(tmp, PROCESSOR_FILE), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
                   "size": {"height": size, "width": size}, "resample": preprocessing.resample,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": list(preprocessing.mean), "image_std": list(preprocessing.std)}, f, indent=2)
