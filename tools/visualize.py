"""MAE reconstructions of a checkpoint, as one PNG: what the model fills in for the hidden patches.

    python -m tools.visualize --checkpoint checkpoints/self-further-pretrain-20000/cub --dataset cub --out recon.png
    python -m tools.visualize --checkpoint vit-mae-tiny --dataset digits --out recon.png      # CPU smoke test

--checkpoint is anything models.load_mae accepts: a directory written by pretrain.py / selftrain.py,
a hub id, or vit-mae-tiny. --num_images images of the split are drawn with --seed, and so is the
masking noise: the same seed shows the same images under the same masks for every checkpoint of
one architecture, so checkpoints can be compared side by side.

One row per image; columns: original, masked input (hidden patches grey), reconstruction, and the
reconstruction with the visible patches pasted back. Models trained with norm_pix_loss predict each
patch normalised by its own mean and variance; the reconstruction undoes that with the statistics
of the original image's patch (the only way to show such a model's output as pixels; docs/records.md, "Reports and
pictures"). So in that case each hidden patch's brightness and contrast come from the original image, and even an
untrained model shows the image's coarse outline at patch resolution: only the detail within a patch
is the model's own. Compare checkpoints with each other (or with θ₀), not with the original.

Output size: an S x S image is upscaled by k = ceil(128 / S) (at least 1; nearest neighbour, so
32 x 32 digits become 128 x 128 cells), cells are separated and framed by 2 white pixels, and a
16-pixel header names the columns. The PNG is 4·S·k + 10 pixels wide and 16 + n·S·k + 2·(n+1)
pixels high for n images; e.g. 8 images at S = 32: 522 x 1058 (W x H), at S = 224: 906 x 1826.
"""
import argparse
import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import outputs
import utils
from data import SPLITS, ImageDataset
from models import TINY_NAME, load_mae, preprocessing_of
from models.hub import initial_config

COLUMNS = ("original", "masked input", "reconstruction", "reconstruction + visible")
MIN_CELL = 128  # pixels: smaller images are upscaled to at least this
GAP = 2  # white pixels between and around the cells
HEADER = 16  # pixels of column titles above the grid
MASKED_GREY = 0.5
NORM_PIX_EPS = 1e-6  # as in transformers' ViTMAEForPreTraining.forward


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(allow_abbrev=False, description="MAE reconstruction grid of a checkpoint.")
    p.add_argument("--checkpoint", required=True,
                   help="a model directory written by pretrain.py / selftrain.py, a hub id, or vit-mae-tiny")
    p.add_argument("--dataset", required=True, help="dataset to draw the images from (as in the three stages)")
    p.add_argument("--data_dir", default="data", help="root holding <dataset>/")
    p.add_argument("--split", default="test", choices=SPLITS)
    p.add_argument("--num_images", type=utils.int_at_least(1), default=8, help="rows of the grid")
    p.add_argument("--mask_ratio", type=utils.finite_float(0, 1, low_open=True, high_open=True), default=0.75,
                   help="fraction of patches hidden from the encoder")
    p.add_argument("--norm_pix_loss", type=utils.str2bool, default=None,
                   help="whether the model predicts per-patch normalised pixels (True/False); default: as "
                        "the checkpoint was trained (its config.json; vit-mae-tiny: True, the recipe's)")
    p.add_argument("--seed", type=utils.int_at_least(0), default=0, help="chooses the images and the masks")
    p.add_argument("--out", type=png_file, default="recon.png", help="the PNG to write (a file name ending in .png)")
    return p


def png_file(value: str) -> str:
    """An argparse type: a file name ending in .png, not a directory (PIL picks the format by the suffix)."""
    if value.endswith(("/", os.sep)) or os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"'{value}' names a directory; give a file name ending in .png, "
                                         f"e.g. {os.path.join(value, 'recon.png')}")
    if not value.lower().endswith(".png"):
        raise argparse.ArgumentTypeError(f"needs a file name ending in .png, got '{value}'")
    return value


# ----------------------------------------------------------------------------- what the checkpoint was trained with

def trained_with_norm_pix_loss(checkpoint: str) -> bool:
    """The norm_pix_loss stored in the checkpoint's config (load_mae overrides it with the recipe's)."""
    if checkpoint == TINY_NAME:
        return True  # an untrained θ₀: show it in the units every run from it learns by default
    return initial_config(checkpoint).norm_pix_loss


# ----------------------------------------------------------------------------- reconstruction

@torch.no_grad()
def reconstruct(mae, images_uint8: torch.Tensor, mean, std, noise: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) uint8 images, (B, N) masking noise -> (B, 4, 3, S, S) in [0, 1]: original, masked
    input, reconstruction, reconstruction with the visible patches pasted back."""
    mae.eval()
    mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    original = images_uint8.float() / 255
    pixel_values = (original - mean) / std
    out = mae(pixel_values, noise=noise)
    pred = out.logits  # (B, N, p*p*3)
    if mae.config.norm_pix_loss:
        # the target was (patch - mean) / sqrt(var + eps) per patch of the normalised image; invert it
        target = mae.patchify(pixel_values)  # (B, N, p*p*3)
        pred = pred * (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = mae.unpatchify(pred, original.shape[-2:]) * std + mean  # (B, 3, S, S)
    hidden = mae.unpatchify(out.mask[..., None].expand_as(pred), original.shape[-2:]).bool()  # 1 = masked
    masked = original.masked_fill(hidden, MASKED_GREY)
    pasted = torch.where(hidden, recon, original)
    return torch.stack([original, masked, recon, pasted], dim=1).clamp(0, 1)


def upscale_factor(image_size: int) -> int:
    return max(1, math.ceil(MIN_CELL / image_size))


def reconstruction_grid(mae, images_uint8: torch.Tensor, mean, std, noise: torch.Tensor) -> np.ndarray:
    """The grid without titles: (H, W, 3) uint8, one row per image, the four columns of reconstruct(),
    each image upscaled by upscale_factor(S) (nearest neighbour), GAP white pixels between and around."""
    panels = reconstruct(mae, images_uint8, mean, std, noise)  # (B, 4, 3, S, S)
    rows, cols, _, size, _ = panels.shape
    k = upscale_factor(size)
    cell = size * k
    panels = (panels * 255).round().to(torch.uint8)
    panels = panels.repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1).permute(0, 1, 3, 4, 2).numpy()
    grid = np.full((rows * cell + (rows + 1) * GAP, cols * cell + (cols + 1) * GAP, 3), 255, dtype=np.uint8)
    for i in range(rows):
        for j in range(cols):
            y, x = GAP + i * (cell + GAP), GAP + j * (cell + GAP)
            grid[y:y + cell, x:x + cell] = panels[i, j]
    return grid


def with_titles(grid: np.ndarray, cell: int) -> Image.Image:
    """The grid under a HEADER-pixel strip naming the columns."""
    image = Image.new("RGB", (grid.shape[1], HEADER + grid.shape[0]), "white")
    image.paste(Image.fromarray(grid), (0, HEADER))
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for j, title in enumerate(COLUMNS):
        centre = GAP + j * (cell + GAP) + cell / 2
        draw.text((centre - draw.textlength(title, font=font) / 2, 2), title, fill="black", font=font)
    return image


# ----------------------------------------------------------------------------- main

def main(args):
    out_dir = outputs.make_dir(os.path.dirname(args.out) or ".", "--out's folder")  # before any work
    mae = load_mae(args.checkpoint, args.mask_ratio)
    mae.config.norm_pix_loss = (trained_with_norm_pix_loss(args.checkpoint) if args.norm_pix_loss is None
                                else args.norm_pix_loss)
    preprocessing = preprocessing_of(args.checkpoint).check(mae.config.image_size)  # checkpoints carry it
    mean, std = preprocessing.mean, preprocessing.std
    dataset = ImageDataset(args.dataset, args.split, args.data_dir, preprocessing.size, preprocessing.resample)

    generator = torch.Generator().manual_seed(args.seed)
    chosen = torch.randperm(len(dataset), generator=generator)[:args.num_images].sort().values
    images = torch.stack([dataset[int(i)][0] for i in chosen])  # (n, 3, S, S) uint8
    noise = torch.rand(len(chosen), mae.vit.embeddings.patch_embeddings.num_patches, generator=generator)

    grid = reconstruction_grid(mae, images, mean, std, noise)
    image = with_titles(grid, mae.config.image_size * upscale_factor(mae.config.image_size))
    try:
        with outputs.atomic(args.out) as tmp:  # a full disk leaves no half-written PNG
            image.save(tmp, format="PNG")
    except OSError as e:
        raise utils.UserError(f"cannot write --out {args.out}: {outputs.failure(e, out_dir)}") from None
    print(f"wrote {args.out} ({image.width} x {image.height}): {len(chosen)} {args.split} images of "
          f"{args.dataset}, mask ratio {args.mask_ratio}, norm_pix_loss {mae.config.norm_pix_loss}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
