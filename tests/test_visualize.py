"""visualize.py: the PNG end to end (size rule, masked / pasted columns), and the numerical claim that
the reconstruction inverts transformers' norm_pix_loss normalisation (an oracle decoder that outputs
exactly the loss target reconstructs the original image)."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models import TINY_NAME, Preprocessing, load_mae, preprocessing_of, save_model
from models.checkpoints import IMAGENET_MEAN, IMAGENET_STD
from tools.visualize import (GAP, HEADER, get_args_parser, main, reconstruction_grid,
                       trained_with_norm_pix_loss, upscale_factor)

GREY = 128  # round(0.5 * 255)


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def cells(grid: np.ndarray, rows: int, cols: int, cell: int) -> np.ndarray:
    """(rows, cols, cell, cell, 3) from a grid laid out as reconstruction_grid documents."""
    return np.stack([np.stack([grid[GAP + i * (cell + GAP):GAP + i * (cell + GAP) + cell,
                                    GAP + j * (cell + GAP):GAP + j * (cell + GAP) + cell] for j in range(cols)])
                     for i in range(rows)])


def patches(cell_image: np.ndarray, grid_side: int) -> np.ndarray:
    """(cell, cell, 3) -> (grid_side**2, pixels) in raster order."""
    side = cell_image.shape[0] // grid_side
    return (cell_image.reshape(grid_side, side, grid_side, side, 3).transpose(0, 2, 1, 3, 4)
            .reshape(grid_side * grid_side, -1))


def test_png_size_and_columns(tmp_path, capsys):
    out = tmp_path / "out" / "recon.png"
    run("--checkpoint", TINY_NAME, "--dataset", "digits", "--data_dir", tmp_path / "data", "--num_images", 5,
        "--out", out)
    assert "norm_pix_loss True" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        png = np.asarray(image)
    # the documented rule: 32 x 32 images -> k = 4, 128-pixel cells
    cell = 32 * upscale_factor(32)
    assert cell == 128
    assert png.shape == (HEADER + 5 * cell + 6 * GAP, 4 * cell + 5 * GAP, 3)
    assert (png[:HEADER] < 128).any()  # column titles

    grid_side, num_patches = 8, 64  # 4x4 patches
    kept = int(num_patches * (1 - 0.75))
    for row in cells(png[HEADER:], 5, 4, cell):
        original, masked, pasted = (patches(row[j], grid_side) for j in (0, 1, 3))
        hidden = (masked == GREY).all(axis=1) & (masked != original).any(axis=1)
        assert hidden.sum() == num_patches - kept
        np.testing.assert_array_equal(masked[~hidden], original[~hidden])
        np.testing.assert_array_equal(pasted[~hidden], original[~hidden])
        # nearest-neighbour upscaling: every 4x4 block of a cell is one source pixel
        assert (row[0][::4, ::4].repeat(4, 0).repeat(4, 1) == row[0]).all()


def oracle_decoder(mae, normalised: bool) -> None:
    """Make the decoder output the MAE loss target exactly: the input's patches, each normalised by its
    own mean and variance when `normalised` (transformers' norm_pix_loss)."""
    seen = {}
    mae.register_forward_pre_hook(lambda module, args: seen.update(pixel_values=args[0]))

    def decoder_forward(latent, ids_restore, **kwargs):
        target = mae.patchify(seen["pixel_values"])
        if normalised:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return SimpleNamespace(logits=target)

    mae.decoder.forward = decoder_forward


def random_images(count=4, size=32) -> torch.Tensor:
    images = torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    images[0, :, :size // 2] = 77  # constant patches: zero variance
    return images


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruction_inverts_norm_pix_loss(norm_pix_loss):
    mae = load_mae(TINY_NAME, norm_pix_loss=norm_pix_loss)
    oracle_decoder(mae, normalised=norm_pix_loss)
    images = random_images()
    noise = torch.rand(len(images), 64, generator=torch.Generator().manual_seed(1))
    # the oracle is transformers' own target: its loss is zero
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert mae((images / 255 - mean) / std, noise=noise).loss.item() < 1e-10

    grid = reconstruction_grid(mae, images, IMAGENET_MEAN, IMAGENET_STD, noise)
    panels = cells(grid, len(images), 4, 128).astype(int)
    original = images.permute(0, 2, 3, 1).repeat_interleave(4, 1).repeat_interleave(4, 2).numpy()
    np.testing.assert_array_equal(panels[:, 0], original)
    assert np.abs(panels[:, 2] - original).max() <= 1  # reconstruction == original to 1/255
    assert np.abs(panels[:, 3] - original).max() <= 1


def test_skipping_the_unnormalisation_is_visible():
    """The check above has teeth: normalised predictions shown as if they were pixels are far off."""
    mae = load_mae(TINY_NAME, norm_pix_loss=False)
    oracle_decoder(mae, normalised=True)
    images = random_images()
    noise = torch.rand(len(images), 64, generator=torch.Generator().manual_seed(1))
    panels = cells(reconstruction_grid(mae, images, IMAGENET_MEAN, IMAGENET_STD, noise), len(images), 4, 128)
    assert np.abs(panels[:, 2].astype(int) - panels[:, 0].astype(int)).mean() > 20


def test_checkpoint_settings(tmp_path):
    """A checkpoint directory's own norm_pix_loss, and the image statistics it was trained with."""
    checkpoint = tmp_path / "further-pretrain-10" / "digits"
    save_model(load_mae(TINY_NAME, norm_pix_loss=False), str(checkpoint),
               Preprocessing(resample=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    assert trained_with_norm_pix_loss(str(checkpoint)) is False
    assert trained_with_norm_pix_loss(TINY_NAME) is True
    read = preprocessing_of(str(checkpoint))
    assert (read.size, read.resample, read.mean, read.std) == (32, 3, (0.5,) * 3, (0.25,) * 3)
    os.remove(checkpoint / "preprocessor_config.json")
    read = preprocessing_of(str(checkpoint))
    assert (read.size, read.resample, read.mean, read.std) == (None, 2, IMAGENET_MEAN, IMAGENET_STD)
