"""The stages' own randomness, as properties of what main() draws (not a function compared with itself):
fine-tuning flips each image with probability 0.5 at each step, independently; the data order is a fresh
permutation of the training set every epoch; every image gets its own masking noise; dropout drops a fraction p
of the hidden states and scales the rest by 1/(1-p), with masks that are new at every step and the same for the
same (seed, step). Each is observed from outside: through the inputs of the stage's training_loss, or forward
hooks, while the stage's own main() runs (helpers.spy, helpers.cut_at)."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

import finetune
import pretrain
import training
import utils

from helpers import Cut, TINY, cut_at, spy, spy_prepare


def _no_training(model, *inputs):
    """A stand-in for training_loss where only the inputs matter: zero, but attached to the parameters."""
    zero = sum(p.sum() for p in model.parameters()) * 0.0
    return zero, {"loss_term": zero}


def _run(module, argv, stop, monkeypatch, train=False):
    """module.main on argv, cut before step `stop`; -> the inputs of every training_loss call."""
    inputs = []
    with monkeypatch.context() as m:
        spy(m, module, "training_loss", lambda *a, **kw: inputs.append([t.detach().clone() if torch.is_tensor(t) else t
                                                                         for t in a[1:]]),
            replace=None if train else _no_training)
        args = module.get_args_parser().parse_args([str(a) for a in argv])
        with training.supplied_draws(cut_at(stop=stop)), pytest.raises(Cut):
            module.main(args)
    return inputs


def test_fine_tuning_flips_each_image_with_probability_one_half(data_dir, tmp_path, monkeypatch):
    def flips(seed, name, stop=150):
        argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--scratch", "True", "--seed", seed,
                "--output_dir", tmp_path / name, "--results_dir", tmp_path / "res", "--log_every", 1000]
        return torch.stack([step[2] for step in _run(finetune, argv, stop, monkeypatch)]).float()  # (steps, 32)

    f = flips(1, "a")
    assert f.shape == (150, 32)  # the recipe's batch of 32, every step
    # 4,800 draws: the rate within 4 standard deviations (0.029) of 0.5; every batch position too (0.16)
    assert abs(f.mean().item() - 0.5) < 0.029, f"flip rate {f.mean().item():.3f}, the recipe's 0.5"
    assert ((f.mean(0) - 0.5).abs() < 0.16).all(), f"flip rates per batch position {f.mean(0).tolist()}"
    # independent: a position agrees with itself one step later, and with its neighbour, half of the time
    assert abs((f[1:] == f[:-1]).float().mean().item() - 0.5) < 0.03, "flips repeat from step to step"
    assert abs((f[:, 1:] == f[:, :-1]).float().mean().item() - 0.5) < 0.03, "flips within a batch are not independent"
    # a function of (seed, step): the same again, other with another seed
    assert torch.equal(flips(1, "b", stop=20), f[:20]), "the same seed flipped differently"
    assert not torch.equal(flips(2, "c", stop=20), f[:20]), "another seed flipped the same images"


def _numbered_images(root, n=24):
    """An image-folder dataset of n images, image k filled with the grey level 8 + 10·k, in two classes."""
    for split in ("train", "test"):
        for k in range(n):
            folder = root / "numbered" / split / f"c{k % 2}"
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 8 + 10 * k, np.uint8)).save(folder / f"{k:02d}.png")


def _image_numbers(images, run) -> list[int]:
    """Normalised images (B, 3, H, W) back to the k of _numbered_images."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (run.preprocessing.mean, run.preprocessing.std))
    pixels = (images * std + mean) * 255  # (B, 3, H, W)
    return [round((v - 8) / 10) for v in pixels[:, 0].mean(dim=(1, 2)).tolist()]


def test_data_order_is_a_fresh_permutation_every_epoch_and_each_image_has_its_own_mask(tmp_path, monkeypatch):
    _numbered_images(tmp_path / "data")

    def order(seed, name):
        seen = spy_prepare(monkeypatch)
        argv = [*TINY, "--dataset", "numbered", "--data_dir", tmp_path / "data", "--batch_size", 8,
                "--seed", seed, "--output_dir", tmp_path / name, "--log_every", 1000]
        steps = _run(pretrain, argv, 12, monkeypatch)  # 12 steps of 8: 4 epochs of the 24 images
        numbers = [k for images, _ in steps for k in _image_numbers(images, seen["run"])]
        return numbers, torch.stack([noise for _, noise in steps])  # (12, 8, 64)

    numbers, noise = order(3, "a")
    epochs = [numbers[e * 24:(e + 1) * 24] for e in range(4)]
    for e, epoch in enumerate(epochs):
        assert sorted(epoch) == list(range(24)), f"epoch {e} is not a permutation of the training set: {epoch}"
    assert len({tuple(e) for e in epochs}) == 4, "the data order repeats from one epoch to the next"
    assert epochs[0] != sorted(epochs[0]), "the data order is not shuffled"
    again, _ = order(3, "b")
    assert again == numbers, "the same seed gave another data order"
    assert order(4, "c")[0] != numbers, "another seed gave the same data order"

    # masking noise: uniform in [0, 1), its own for every image of a batch and for every step
    flat = noise.flatten()
    assert 0 <= flat.min() and flat.max() < 1 and abs(flat.mean().item() - 0.5) < 0.01
    kept = noise.argsort(dim=-1)[..., :16]  # the 16 patches with the smallest noise stay visible
    for step in range(12):
        assert len({tuple(sorted(row)) for row in kept[step].tolist()}) == 8, f"step {step}: images share a mask"
    image0 = [noise[s, j] for s in range(12) for j in range(8) if numbers[8 * s + j] == 0]
    assert len(image0) == 4 and not torch.equal(image0[0], image0[1]), "an image gets the same mask every epoch"


def test_dropout_drops_the_rate_and_scales_the_rest_with_new_masks_each_step(data_dir, tmp_path, monkeypatch):
    """Fine-tuning's dropout 0.1 on the hidden states: the observed fraction of dropped elements, the 1/(1-p)
    scaling of the kept ones, masks that differ between steps and rows, and the same masks for the same
    (seed, step) in another run -- also in a run resumed at step 2, whose process drew nothing before it."""
    def masks(name, *extra, cut=3):
        seen, kept, inputs = spy_prepare(monkeypatch), [], []

        def hook(module, args, output):
            if module.training:
                kept.append(output != 0)
                inputs.append((args[0], output))

        def on_step(step):
            if not seen.get("hooked"):  # the first step this process takes
                seen["hooked"] = True
                for module in seen["model"].modules():
                    if "Dropout" in type(module).__name__ and module.p > 0:
                        module.register_forward_hook(hook)
        argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--scratch", "True", "--steps", 50,
                "--output_dir", tmp_path / name, "--results_dir", tmp_path / "res", "--log_every", 1000, *extra]
        args = finetune.get_args_parser().parse_args([str(a) for a in argv])
        with training.supplied_draws(cut_at(stop=cut, on_step=on_step)), pytest.raises(Cut):
            finetune.main(args)
        return kept, inputs

    kept, inputs = masks("a")
    per_step = len(kept) // 3
    assert per_step == 9, f"{per_step} dropout layers per step (ViT: embeddings + 2 per layer of 4)"
    dropped = torch.cat([(~k).flatten().float() for k in kept])
    assert abs(dropped.mean().item() - 0.1) < 0.005, f"dropout rate {dropped.mean().item():.4f}, the recipe's 0.1"
    for x, y in inputs:
        torch.testing.assert_close(y[y != 0], (x / 0.9)[y != 0], msg="kept hidden states are not scaled by 1/(1-p)")
    assert not torch.equal(kept[0], kept[per_step]), "the same dropout mask at two steps"
    assert not torch.equal(kept[0][0], kept[0][1]), "two images of a batch share a dropout mask"
    again, _ = masks("b")
    assert all(torch.equal(a, b) for a, b in zip(kept, again)), "the same (seed, step) gave other dropout masks"
    masks("c", "--save_every", 2, cut=2)  # saved after step 2 ...
    resumed, _ = masks("c", "--save_every", 2)  # ... and resumed: step 3 only, in a process that drew nothing yet
    assert len(resumed) == per_step and all(torch.equal(a, b) for a, b in zip(kept[2 * per_step:], resumed)), \
        "dropout masks depend on what the process drew before, not on (seed, step) alone"
