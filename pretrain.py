"""Stage 1 — further pre-training (the teacher).

Continues masked auto-encoding (MAE) of the initial model θ₀ on the target dataset's training
images (labels unused). The result θ_T is the teacher of self-distillation (selftrain.py), and can
itself be fine-tuned (finetune.py) for the paper's "further pre-training" row.

    python pretrain.py --dataset cub                       # the recipe: ViT-B/16 MAE, 20k steps, batch 64
    bash run_pretrain.sh 0 cub                             # the same, through the original launcher
    python pretrain.py --dataset digits --model_name vit-mae-tiny --steps 50 --batch_size 16 --device cpu

Writes <checkpoint_dir>/further-pretrain-<steps>/<dataset>/: the full MAE model (config.json +
model.safetensors) with its model card (README.md), args.json (the run record) and metrics.jsonl.
"""
import argparse
import os

import training
import utils
from data import ImageDataset
from data.identity import SplitInput
from mae_common import MAE_BETAS, further_pretrain_dir, mae_args_parser, no_weight_decay
from models import load_mae, mae_loss, preprocessing_of, save_model
from models.identity import WeightsInput
from outputs.card import model_card
from outputs.plots import plot_metrics


def get_args_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description="Further pre-training: MAE on the target images (stage 1).",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                   parents=[mae_args_parser()], allow_abbrev=False)


def training_loss(mae, images, noise):
    """The stage's objective on one batch: the MAE loss. images (B, 3, H, W) normalised, noise (B, N):
    the patches with the smallest noise stay visible. -> (loss, the terms to log)."""
    loss = mae_loss(mae, images, noise)
    return loss, {"mae_loss": loss}


def main(args):
    out_dir = args.output_dir or further_pretrain_dir(args.checkpoint_dir, args.steps, args.dataset)
    preprocessing = preprocessing_of(args.model_name)  # θ₀'s image processor, as in the release
    reads = {"θ₀": WeightsInput(args.model_name), "train split": SplitInput(args.dataset, "train", args.data_dir)}
    run = training.Run(args, out_dir, "further-pretrain", os.path.join(out_dir, "model.safetensors"), preprocessing,
                       reads=reads)
    if run.already_done:
        return

    # ---- the initial model θ₀ and the target images
    mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)  # sin-cos tables frozen
    preprocessing = preprocessing.check(mae.config.image_size)
    dataset = ImageDataset(args.dataset, "train", args.data_dir, preprocessing.size, preprocessing.resample)
    num_patches = mae.vit.embeddings.patch_embeddings.num_patches

    # ---- optimizer: AdamW, linear decay to 0
    optimizer, scheduler = run.adamw(mae, no_weight_decay, MAE_BETAS)
    model = run.prepare(mae, optimizer, scheduler)

    # ---- MAE training
    model.train()

    @run.graphed  # --cuda_graph: this step captured whole in one CUDA graph (training/cuda_graph.py)
    def train_step(step, images, noise):
        for micro in run.micro_batches(images, noise):  # --accum_steps K: K slices of the batch and its draws
            with run.forward(step):  # autocast; dropout seeded from (seed, step); DDP syncs after the last slice
                loss, terms = training_loss(model, *micro)
            run.backward(loss, terms)  # scaled by 1/K: the K gradients sum to the batch's
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, (images, _, _) in run.batches(dataset):
        noise = run.masking_noise(step, num_patches)  # (B, N), a function of (seed, step, sample)
        train_step(step, images, noise)

    if run.is_main:
        save_model(mae, out_dir, preprocessing, card=model_card(out_dir))  # the card travels with the weights
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[further-pretrain] saved {out_dir}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
