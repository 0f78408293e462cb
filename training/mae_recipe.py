"""MAE's fine-tuning recipe (He et al. 2022, FINETUNE.md, ViT-B) as pieces finetune.py can switch on one by one, built
on timm's implementations: layer-wise lr decay (timm's param_groups_layer_decay rule on the transformers ViT's
names), drop path (models.vit_mae.build_classifier, timm's drop_path), RandAugment (timm's create_transform),
random erasing (timm's RandomErasing), mixup / cutmix with label smoothing (timm's Mixup, SoftTargetCrossEntropy),
and a warmup-then-cosine schedule (timm's CosineLRScheduler with warmup_prefix).

    RECIPES["release"]   the paper's fine-tuning (the authors' release): every piece off, linear schedule
    RECIPES["mae"]       MAE's values: layer decay 0.65, drop path 0.1, mixup 0.8, cutmix 1.0, smoothing 0.1,
                         RandAugment rand-m9-mstd0.5-inc1, random erasing 0.25, cosine schedule, weight decay 0.05

Randomness: timm's functions draw from Python's `random`, numpy's and torch's global generators. Each call here
seeds them right before from (seed, stream, step) -- and, for the per-image pieces, the image's place in the global
batch -- and puts their previous states back after, so a draw is a function of those numbers only: one process and
N processes take the same steps, and a resumed run needs no saved random-number state (training/draws.py).
"""
import contextlib
import dataclasses
import math
import random
import re

import numpy as np
import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.data.auto_augment import RandAugment
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy

from errors import UserError
import utils
from training.step import linear_schedule
from utils import STREAM_ERASE, STREAM_MIX, STREAM_RANDAUG, mix_seed

RECIPES = {
    "release": dict(layer_decay=1.0, drop_path=0.0, mixup=0.0, cutmix=0.0, label_smoothing=0.0, reprob=0.0,
                    randaug="none", schedule="linear", weight_decay=0.01),
    "mae": dict(layer_decay=0.65, drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, reprob=0.25,
                randaug="rand-m9-mstd0.5-inc1", schedule="cosine", weight_decay=0.05),
}
RANDAUG_INTERPOLATION = "bicubic"  # MAE's fine-tuning transform


# ----------------------------------------------------------------------------- flags: --recipe sets the defaults

not_given = utils.not_given  # the release's value as a parser default that --recipe may replace


def resolve_recipe(args) -> None:
    """Fill in the recipe's value for every piece not given on the command line (in place), as plain values:
    the record holds what ran. A bad --randaug string is refused here, before anything is read."""
    recipe = RECIPES[args.recipe]
    for name, value in recipe.items():
        given = getattr(args, name)
        setattr(args, name, type(value)(value if isinstance(given, utils.NotGiven) else given))
    if args.randaug != "none":
        randaug_transform(args.randaug, 32, (0.5,) * 3)  # raises on a string timm cannot read


def recipe_dir(recipe: str) -> str:
    """The folder below <init> a recipe's results go to: '' for the release (the paper's table), else
    recipe-<name>, so report.py shows another recipe as another row, never averaged with the release's runs."""
    return "" if recipe == "release" else f"recipe-{recipe}"


# ----------------------------------------------------------------------------- AdamW groups and the schedule

def mae_no_weight_decay(name: str, param) -> bool:
    """MAE's rule: no weight decay on 1-D tensors (biases, LayerNorm weights), the position embeddings and the
    cls token."""
    return param.ndim <= 1 or name.endswith(("position_embeddings", "cls_token"))


def layer_id(name: str, num_layers: int) -> int:
    """timm's layer of a transformers ViT parameter (its ViT's group_matcher): the embeddings 0, block N N + 1, the
    final LayerNorm with the last block (num_layers; MAE's own lr_decay.py puts it with the head, a factor
    layer_decay apart on its two vectors), the head num_layers + 1."""
    if name.startswith("vit.embeddings."):
        return 0
    if name.startswith("vit.layernorm."):
        return num_layers
    m = re.match(r"vit\.(?:encoder\.)?layers?\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else num_layers + 1


def layer_decay_groups(model, lr: float, weight_decay: float, no_decay, layer_decay: float) -> list[dict]:
    """AdamW groups with layer-wise lr decay: a parameter of layer i (layer_id) trains at lr · layer_decay^(L+1-i),
    L blocks (timm's param_groups_layer_decay, whose `lr_scale` each group keeps); `no_decay(name, param)` selects
    the parameters without weight decay. Frozen parameters are left out."""
    num_layers = model.config.num_hidden_layers
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer, decay = layer_id(name, num_layers), 0.0 if no_decay(name, param) else weight_decay
        scale = layer_decay ** (num_layers + 1 - layer)
        groups.setdefault((layer, decay), {"params": [], "weight_decay": decay, "lr": lr * scale,
                                           "lr_scale": scale})["params"].append(param)
    return list(groups.values())


def cosine_schedule(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup from 0 over warmup_steps, then a half cosine to 0 at total_steps (MAE's; timm's
    CosineLRScheduler with warmup_prefix and lr_min 0). MAE ends at min_lr 1e-6, 0.05% of its lr: here 0, as the
    linear schedule."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule}


# ----------------------------------------------------------------------------- the loss

def soft_target_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: the loss on the mixed or smoothed targets (B, classes) Augment gives. On
    smoothed one-hot targets it is timm's LabelSmoothingCrossEntropy (MAE's loss without mixup), up to rounding."""
    return SoftTargetCrossEntropy()(logits, targets)


# ----------------------------------------------------------------------------- augmentation of a step's batch

@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Python's random, numpy's and torch's global generators (CPU, and `device` on CUDA) seeded from `seed`
    inside the block, their states put back after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            reseed(seed)
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def reseed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def randaug_transform(config: str, image_size: int, mean) -> RandAugment:
    """timm's RandAugment as create_transform builds it for a training image of this size (translate by 45% of the
    size, fill with the mean colour, bicubic)."""
    try:
        pipeline = create_transform(image_size, is_training=True, auto_augment=config,
                                    interpolation=RANDAUG_INTERPOLATION, mean=tuple(mean))
    except (AssertionError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"--randaug {config!r} is not a timm rand-augment string ({e or type(e).__name__}); "
                        f"use e.g. rand-m9-mstd0.5-inc1, or none") from None
    found = [t for t in pipeline.transforms if isinstance(t, RandAugment)]
    if not found:
        raise UserError(f"--randaug {config!r} is not a timm rand-augment string (it must start with 'rand'); "
                        f"use e.g. rand-m9-mstd0.5-inc1, or none")
    return found[0]


@dataclasses.dataclass(frozen=True)
class Pieces:
    """The recipe's pieces as a run resolved them (resolve_recipe): one field per key of RECIPES' recipes."""
    layer_decay: float
    drop_path: float
    mixup: float
    cutmix: float
    label_smoothing: float
    reprob: float
    randaug: str
    schedule: str
    weight_decay: float

    @classmethod
    def from_flags(cls, flags: dict) -> "Pieces":
        """The pieces among a run's flags (vars(args), resolved)."""
        return cls(**{name: flags[name] for name in RECIPES["release"]})


class Augment:
    """What the recipe does to a step's batch before the forward, in MAE's order: RandAugment (per image, on its
    uint8 pixels), random erasing (per image, normalised), mixup / cutmix (on the batch, with the smoothed
    targets). augment(step, images, labels) -> (images, targets): images (B_local, 3, H, W) normalised, labels
    (B_local,); targets are the labels unless mixing or smoothing, else (B_local, classes) soft targets (timm's
    mixup_target: with mixing the mixed, smoothed ones; without, the smoothed one-hot). With every piece off it
    returns its inputs.

    The images of a step are this process's rows of the global batch; row r is global row rank · B_local + r.
    Per-image draws are seeded from (seed, stream, step, global row). Mixup pairs global rows 2k and 2k+1 (timm's
    Mixup, mode 'batch', mixes each row with the mirrored one: the rows are put in an order that mirrors a row
    onto its pair), with one λ and box per step from (seed, stream, step): the same in every process, so the
    pairs stay within a process when B_local is even."""

    def __init__(self, pieces: Pieces, seed: int, mean: torch.Tensor, std: torch.Tensor, rank: int, num_classes: int,
                 image_size: int):
        self.seed, self.rank, self.mean, self.std = seed, rank, mean, std
        self.num_classes, self.label_smoothing = num_classes, pieces.label_smoothing
        self.randaug = (None if pieces.randaug == "none"
                        else randaug_transform(pieces.randaug, image_size, mean.flatten().tolist()))
        # MAE's: one erased rectangle filled with per-pixel normal noise
        self.erase = (RandomErasing(pieces.reprob, mode="pixel", max_count=1, device="cpu") if pieces.reprob > 0
                      else None)
        self.mixup = None
        if pieces.mixup > 0 or pieces.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=pieces.mixup, cutmix_alpha=pieces.cutmix, prob=1.0, switch_prob=0.5,
                               mode="batch", label_smoothing=pieces.label_smoothing, num_classes=num_classes)

    def __call__(self, step: int, images: torch.Tensor, labels: torch.Tensor):
        first = self.rank * images.shape[0]  # this process's first row in the global batch
        if self.randaug is not None:
            images = self.rand_augment(step, images, first)
        if self.erase is not None:
            images = self.random_erase(step, images, first)
        if self.mixup is not None:
            return self.mix(step, images, labels)
        if self.label_smoothing > 0:
            return images, mixup_target(labels, self.num_classes, smoothing=self.label_smoothing)
        return images, labels

    def to_uint8(self, images: torch.Tensor) -> torch.Tensor:
        """The normalised images back to the uint8 pixels they were made from (exact: the error is far below 1/2)."""
        return (images * self.std + self.mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)

    def rand_augment(self, step: int, images: torch.Tensor, first: int) -> torch.Tensor:
        pixels = self.to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        out = []
        with seeded(0, images.device):
            for row, image in enumerate(pixels):
                reseed(mix_seed(self.seed, STREAM_RANDAUG, step, first + row))
                out.append(np.asarray(self.randaug(Image.fromarray(image)), dtype=np.uint8))
        augmented = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).to(images.device)
        return (augmented.float().div_(255) - self.mean) / self.std

    def random_erase(self, step: int, images: torch.Tensor, first: int) -> torch.Tensor:
        out = images.to("cpu", copy=True)  # erased in place; timm draws the noise on the CPU, as MAE's loader
        with seeded(0, images.device):
            for row in range(out.shape[0]):
                reseed(mix_seed(self.seed, STREAM_ERASE, step, first + row))
                self.erase(out[row])  # in place
        return out.to(images.device)

    def mix(self, step: int, images: torch.Tensor, labels: torch.Tensor):
        b = images.shape[0]
        # evens ascending, then odds descending: flip(0) of this order maps row 2k onto 2k+1
        order = torch.cat([torch.arange(0, b, 2), torch.arange(1, b, 2).flip(0)]).to(images.device)
        back = torch.argsort(order)
        with seeded(mix_seed(self.seed, STREAM_MIX, step), images.device):
            mixed, targets = self.mixup(images[order].clone(), labels[order])
        return mixed[back], targets[back]


def check_mix_batch(pieces: Pieces, batch_size: int, local_batch: int, accum_steps: int) -> None:
    """Mixup pairs rows 2k, 2k+1 of the global batch: each process must hold whole pairs. Drop path draws for the
    rows of the whole batch a forward sees, which --accum_steps would cut into micro-batches."""
    if pieces.drop_path > 0 and accum_steps > 1:
        raise UserError("--drop_path draws its masks for the batch a forward sees, so it does not yet combine with "
                        "--accum_steps > 1: pass one of them")
    if (pieces.mixup > 0 or pieces.cutmix > 0) and local_batch % 2:
        raise UserError(f"--mixup / --cutmix mix pairs of images, but each process gets {local_batch} images a step "
                        f"(--batch_size {batch_size}); use a batch size that gives each process an even number")
