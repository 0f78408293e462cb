"""Reading and writing weights and their preprocessing: model directories (ours, or stock `save_pretrained`),
the authors' release `model.pt`, and the image-processor file.

    preprocessing_of(name)      the image preprocessing θ₀ (or a checkpoint) was trained with
    has_checkpoint(path)        whether `path` holds a model directory or a release model.pt
    load_encoder_state(path, name)  (config, encoder state dict with transformers-5 names) of a checkpoint
    load_encoder(path, name)    the encoder of a checkpoint (the frozen teacher)
    save_model(model, dir)      a directory stock `from_pretrained` opens (config.json + model.safetensors),
                                with its model card (outputs/card.py) when given one

Checkpoints written by the authors' release (`model.pt`, a pickled {"args", "state_dict"} of the
encoder with transformers-4.x parameter names) are read wherever a checkpoint is read.

Imports models.hub (where a name leads) and nothing else from models/; models.vit_mae (the method) imports it.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil

import torch
from torch import nn
from transformers import ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

import outputs
from errors import RunFailed, UserError
from models.hub import PROCESSOR_FILE, WEIGHTS_FILES, _load_dir, _model_dir_type, _processor_file, initial_config

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_CHECKPOINT = "model.pt"  # the authors' release
CARD_FILE = "README.md"  # the model card (outputs/card.py)


# ----------------------------------------------------------------------------- the image preprocessing

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
    for key in _SHARED_ARCH:  # a RoBERTa config has no image keys: None on both sides
        if getattr(config, key, None) != getattr(reference, key, None):
            raise UserError(f"{what} does not match the model's architecture "
                            f"({key}: {getattr(config, key, None)} vs {getattr(reference, key, None)})")


def load_encoder(path: str, model_name: str, reference: ViTMAEConfig) -> ViTMAEModel:
    """The encoder of a checkpoint as a ViTMAEModel (the frozen teacher), checked against `reference`."""
    config, state = load_encoder_state(path, model_name)
    check_same_architecture(config, reference, f"checkpoint '{path}'")
    encoder = ViTMAEModel(config)
    _load_exact(encoder, state, f"checkpoint '{path}'")
    return encoder


def save_model(model: nn.Module, out_dir: str, preprocessing: Preprocessing = Preprocessing(),
               card: str | None = None, tokenizer=None) -> None:
    """config.json + model.safetensors, readable by stock `from_pretrained`, the preprocessing the
    model was trained with (a ViTImageProcessor file: resize, rescale to [0, 1], normalise) or, for a text model,
    its `tokenizer` (save_pretrained's files), and the model card `card` (README.md, outputs.card.model_card).

    Written into a temporary folder first and moved in weights-last, so `model.safetensors` exists
    only once the whole checkpoint, card included, is there (the stages use it as their "done" marker)."""
    tmp = os.path.join(out_dir, ".saving")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_model(model, tmp, preprocessing, card, tokenizer)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder: nothing half-written is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise RunFailed(f"cannot write the model into {out_dir}: {outputs.failure(e, out_dir)}") from None
    names = sorted(os.listdir(tmp), key=lambda n: n.endswith(".safetensors"))
    for name in names:
        os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    os.rmdir(tmp)


def _write_model(model: nn.Module, tmp: str, preprocessing: Preprocessing, card: str | None, tokenizer) -> None:
    model.save_pretrained(tmp)
    if card is not None:
        with open(os.path.join(tmp, CARD_FILE), "w", encoding="utf-8") as f:
            f.write(card)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        return
    size = model.config.image_size
    with open(os.path.join(tmp, PROCESSOR_FILE), "w") as f:
        json.dump({"image_processor_type": "ViTImageProcessor", "do_resize": True,
                   "size": {"height": size, "width": size}, "resample": preprocessing.resample,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                   "image_mean": list(preprocessing.mean), "image_std": list(preprocessing.std)}, f, indent=2)
