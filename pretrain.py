"""Stage 1 — further pre-training (the teacher).

Continues masked auto-encoding (MAE) of the initial model θ₀ on the target dataset's training
images (labels unused). The result θ_T is the teacher of self-distillation (selftrain.py), and can
itself be fine-tuned (finetune.py) for the paper's "further pre-training" row.

    python pretrain.py --dataset cub                       # the recipe: ViT-B/16 MAE, 20k steps, batch 64
    bash run_pretrain.sh 0 cub                             # the same, through the original launcher
    python pretrain.py --dataset digits --model_name vit-mae-tiny --steps 50 --batch_size 16 --device cpu

On a text dataset (its train.jsonl; chemprot, citation_intent, sciie, twitter_emotion) the same stage is masked
language modelling of a RoBERTa θ₀ (default roberta-base) on the training texts, the text recipe's defaults filled
in (text_common.py):

    python pretrain.py --dataset chemprot                  # roberta-base, MLM, batch 256, lr 1e-4
    python pretrain.py --dataset fortunes --model_name roberta-tiny --steps 50 --batch_size 16 --device cpu

Writes <checkpoint_dir>/further-pretrain-<steps>/<dataset>/: the full MAE model (config.json +
model.safetensors) with its model card (README.md), args.json (the run record) and metrics.jsonl; for text the
RobertaForMaskedLM and its tokenizer.
"""
import argparse
import os

import text_common
import training
import utils
from data import ImageDataset
from data.identity import SplitInput
from data.text import TextSplit
from mae_common import MAE_BETAS, further_pretrain_dir, mae_args_parser, no_weight_decay
from models import load_mae, load_mlm, load_tokenizer, mae_loss, mlm_loss, preprocessing_of, save_model
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


def mlm_training_loss(mlm, masked_ids, labels, attention_mask, num_masked):
    """The stage's objective on one batch of text: MLM's cross-entropy at the selected tokens (labels != -100),
    summed and divided by num_masked (Run.token_mean_divisor). masked_ids, labels, attention_mask (B, L)."""
    loss = mlm_loss(mlm, masked_ids, attention_mask, labels, num_masked)
    return loss, {"mlm_loss": loss}


def main(args):
    kind = text_common.run_modality(args)
    text_common.resolve_defaults(args, kind, "mlm")  # the flags not given: the image or the text recipe's values
    if kind == "text":
        return main_text(args)
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


def main_text(args):
    """Stage 1 on text: masked language modelling of θ₀ (a RoBERTa) on the target dataset's training texts."""
    out_dir = args.output_dir or further_pretrain_dir(args.checkpoint_dir, args.steps, args.dataset)
    reads = {"θ₀": WeightsInput(args.model_name), "train split": SplitInput(args.dataset, "train", args.data_dir)}
    run = training.Run(args, out_dir, "further-pretrain", os.path.join(out_dir, "model.safetensors"), None,
                       reads=reads)
    if run.already_done:
        return

    # ---- the initial model θ₀ (encoder + LM head) with its tokenizer, and the target texts, tokenised once
    mlm, tokenizer = load_mlm(args.model_name), load_tokenizer(args.model_name)
    texts = text_common.tokenized(TextSplit(args.dataset, "train", args.data_dir), tokenizer,
                                  args.max_length)

    # ---- optimizer: AdamW with RoBERTa's betas and epsilon, linear warmup then decay to 0
    optimizer, scheduler = run.adamw(mlm, text_common.no_weight_decay, text_common.MLM_BETAS,
                                     eps=text_common.MLM_EPS)
    model = run.prepare(mlm, optimizer, scheduler)

    # ---- MLM training
    model.train()

    def train_step(step, masked_ids, labels, attention_mask, num_masked):
        for micro in run.micro_batches(masked_ids, labels, attention_mask):  # --accum_steps K: K slices
            with run.forward(step):  # autocast; dropout seeded from (seed, step); DDP syncs after the last slice
                loss, terms = mlm_training_loss(model, *micro, num_masked)
            run.backward(loss, terms)  # scaled by 1/K
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, ((input_ids, attention_mask), _, _) in run.batches(texts):
        masked_ids, labels = text_common.draw_mlm_masks(run, step, input_ids, attention_mask, tokenizer,
                                                        args.mask_ratio, args.max_length)  # (seed, step, sample)
        train_step(step, masked_ids, labels, attention_mask, run.token_mean_divisor((labels != -100).sum()))

    if run.is_main:
        save_model(mlm, out_dir, card=model_card(out_dir), tokenizer=tokenizer)
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[further-pretrain] saved {out_dir}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
