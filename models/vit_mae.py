"""The ViT-MAE pieces the method needs, by name, on top of Hugging Face `transformers`.

    load_mae(name)              the initial MAE model θ₀ (encoder + decoder): hub id, local dir, or `vit-mae-tiny`;
                                its two fixed sin-cos position tables frozen, as in MAE and the release
    mae_loss(mae, x, noise)     MAE reconstruction loss on the masked image
    cls_feature(encoder, x)     CLS token of the last layer after the final LayerNorm, on the *unmasked* image:
                                the representation h(x) that self-distillation matches
    MAEWithFeature(mae)         the self-distillation student: both terms from one forward
    build_classifier(...)       ViTForImageClassification whose encoder comes from θ₀ or a checkpoint
    build_encoder(...)          the encoder alone (ViTMAEModel), from θ₀ or a checkpoint: the probes' frozen encoder
    checkpoint_activations(m)   --grad_checkpointing: recompute the layers in the backward pass

Where a model name leads (hub id, local directory) is models.hub; reading and writing checkpoints and the image
preprocessing is models.checkpoints. This module imports both; neither imports it.
"""
import contextlib

import numpy as np
import torch
from timm.layers import drop_path
from torch import nn
from transformers import (PreTrainedModel, ViTConfig, ViTForImageClassification, ViTMAEConfig, ViTMAEForPreTraining,
                          ViTMAEModel)

from errors import UserError
from models.checkpoints import _SHARED_ARCH, _load_exact, load_encoder_state
from models.hub import TINY_CONFIG, TINY_NAME, _from_pretrained
from utils import mix_seed

TINY_INIT_SEED = 0  # vit-mae-tiny's θ₀ is this seed's initialisation, the same in every stage and run


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


def checkpoint_activations(model: nn.Module) -> None:
    """--grad_checkpointing: every transformers model inside `model` (the MAE's encoder and decoder layers, the
    classifier's encoder layers) recomputes each layer's forward in the backward pass instead of keeping its
    activations. torch.utils.checkpoint restores the random-number state before recomputing, so dropout draws
    the masks of the forward again and the gradients are the same."""
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.activation_checkpointing_enable()  # non-reentrant checkpoints (transformers' default)


# ----------------------------------------------------------------------------- the fine-tuning classifier

def build_classifier(config: ViTMAEConfig, encoder_state: dict, num_classes: int, dropout: float,
                     drop_path: float = 0.0, rank: int = 0, world: int = 1, seed: int | None = None
                     ) -> ViTForImageClassification:
    """A ViT classifier (linear head on the final-LayerNorm CLS token) whose encoder is `encoder_state`.

    Every encoder tensor comes from `encoder_state`; only `classifier.weight/bias` are new: transformers'
    initialisation under the seed mix_seed(seed, rank) when `seed` is given (whatever drew from the global generator
    before; under DDP process 0's head is broadcast), else from the global generator as it stands. drop_path > 0:
    stochastic depth on both residual branches of every block (DropPathGlobalBatch, for process `rank` of `world`),
    at rates rising linearly from 0 in the first block to drop_path in the last, as timm's ViT."""
    vit_config = ViTConfig(**{k: getattr(config, k) for k in _SHARED_ARCH}, num_labels=num_classes,
                           hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(mix_seed(seed, rank))
        model = ViTForImageClassification(vit_config)
    _load_exact(model, {"vit." + k: v for k, v in encoder_state.items()}, "the encoder checkpoint",
                allowed_missing=("classifier.weight", "classifier.bias"))
    if drop_path > 0:
        rates = torch.linspace(0, drop_path, len(model.vit.layers)).tolist()
        for layer, rate in zip(model.vit.layers, rates):
            # the block's dropout ends both branches, before each residual sum: drop path goes right after it
            layer.dropout = nn.Sequential(layer.dropout, DropPathGlobalBatch(rate, rank, world))
    return model


def build_encoder(config: ViTMAEConfig, encoder_state: dict) -> ViTMAEModel:
    """The encoder alone, every tensor from `encoder_state` (nothing new): the frozen encoder of the probes."""
    encoder = ViTMAEModel(config)
    _load_exact(encoder, encoder_state, "the encoder checkpoint")
    return encoder


class DropPathGlobalBatch(nn.Module):
    """timm's drop_path (a whole branch zeroed per sample, the rest scaled by 1 / keep), its per-sample draws made
    for the whole global batch and sliced to this process's rows, like training.draws.GlobalBatchDropout: a sample's
    draw depends on (seed, step, its place in the global batch), not on the number of processes. Draws from the default
    generator, which the step seeds before the forward (training.Run.forward). x: (B_local, ...)."""

    def __init__(self, p: float, rank: int, world: int):
        super().__init__()
        self.p, self.rank, self.world = p, rank, world

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        b = x.shape[0]
        keep = drop_path(x.new_ones(b * self.world, *(1,) * (x.ndim - 1)), self.p, training=True)
        return x * keep[self.rank * b:(self.rank + 1) * b]

    def extra_repr(self) -> str:
        return f"p={self.p}, rank={self.rank}, world={self.world}"


def start_encoder_state(scratch: bool, checkpoint: str, model_name: str) -> tuple[ViTMAEConfig, dict]:
    """(config, encoder state dict) that fine-tuning and the probes start from: θ₀'s (`model_name`) with
    --scratch True, else the checkpoint's (a stage's model directory or a release model.pt)."""
    if scratch:
        initial = load_mae(model_name)
        return initial.config, initial.vit.state_dict()
    return load_encoder_state(checkpoint, model_name)
