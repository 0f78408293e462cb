"""Stage 2 — self-distillation (the student).

The student starts again from the initial model θ₀ (encoder and decoder, not the teacher's
weights) and is trained with MAE plus a loss that pulls its representation of each unmasked
image toward that of the frozen, further pre-trained teacher θ_T (pretrain.py):

    L = L_MAE(student; masked x) + λ · distill_loss(h_S(x), h_T(x))

h(x) is the CLS token of the last encoder layer after the final LayerNorm, on all patches. The
distillation gradient reaches the student's encoder only; the decoder learns from MAE alone.

    python selftrain.py --dataset cub                      # teacher: checkpoints/further-pretrain-20000/cub
    bash run_selftrain.sh 0 cub
    python selftrain.py --dataset digits --model_name vit-mae-tiny --steps 50 --batch_size 16 --device cpu

On a text dataset the student is θ₀ (a RoBERTa: encoder and LM head) trained with MLM plus the same distillation
loss, h(x) the `<s>` token of the last layer on the unmasked text (padding excluded by the attention mask), the
teacher stage 1's RobertaForMaskedLM; the distillation gradient reaches the encoder, not the LM head:

    python selftrain.py --dataset chemprot                 # teacher: checkpoints/further-pretrain-20000/chemprot

Writes <checkpoint_dir>/self-further-pretrain-<steps>/<dataset>/ (same contents as stage 1).
"""
import argparse
import os

import torch

import paper
import text_common
import training
import utils
from data import ImageDataset
from data.identity import SplitInput
from data.text import TextSplit
from mae_common import (MAE_BETAS, creating_command, further_pretrain_dir, mae_args_parser, no_weight_decay,
                        self_distill_dir)
from models import (MAEWithFeature, MLMWithFeature, cls_feature, first_token_feature, has_checkpoint, load_encoder,
                    load_mae, load_mlm, load_tokenizer, preprocessing_of, save_model)
from models.checkpoints import check_same_architecture
from models.identity import WeightsInput
from outputs.card import model_card
from outputs.plots import plot_metrics


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Self-distillation: MAE + matching the teacher's CLS (stage 2).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                parents=[mae_args_parser()], allow_abbrev=False)
    g = p.add_argument_group("self-distillation")
    g.add_argument("--teacher", default=None,
                   help="the further pre-trained model (a directory written by pretrain.py, or the release's "
                        "model.pt); default: <checkpoint_dir>/further-pretrain-<steps>/<dataset>")
    g.add_argument("--distill_weight", type=utils.finite_float(0), default=1.0,
                   help="λ, the weight of the distillation loss")
    g.add_argument("--teacher_device", type=utils.device_spec, default=None,
                   help="run the teacher on another device (e.g. cuda:1); default: the student's device")
    return p


def distill_loss(student_cls: torch.Tensor, teacher_cls: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_i ‖h_S(x_i) − stopgrad(h_T(x_i))‖²: squared L2 distance summed over the hidden
    dimensions, averaged over the batch. (B, D), (B, D) -> scalar."""
    return (student_cls.float() - teacher_cls.detach().float()).pow(2).sum(dim=-1).mean()


def training_loss(student: MAEWithFeature, images, noise, teacher_cls, distill_weight: float):
    """L = L_MAE(student; masked x) + λ · distill_loss(h_S(x), h_T(x)) on one batch. images (B, 3, H, W),
    noise (B, N), teacher_cls (B, D) the frozen teacher's h_T(x). -> (loss, the terms to log)."""
    mae, student_cls = student(images, noise)  # scalar, (B, D) on the unmasked images
    distill = distill_loss(student_cls, teacher_cls)
    return mae + distill_weight * distill, {"mae_loss": mae, "distill_loss": distill}


@torch.no_grad()
def teacher_features(teacher, teacher_device, run: training.Run, dataset) -> torch.Tensor:
    """h_T(x) of every image of `dataset`, (N, D) on run.device, computed as each step would compute it
    (under run.autocast, in batches of the steps' shape), so a row equals the on-line h_T(x) of that image:
    each row of the encoder's output depends on its own image only. A text split: h_T(x) of each text, the `<s>`
    token of the teacher's last layer on the unmasked text (padding excluded by the attention mask)."""
    table = None
    for index, inputs in run.ordered_batches(dataset):
        with torch.inference_mode(), run.autocast():  # the teacher is frozen: no graph to keep
            if isinstance(inputs, tuple):  # text: (input_ids, attention_mask)
                features = first_token_feature(teacher, *(x.to(teacher_device) for x in inputs))
            else:
                features = cls_feature(teacher, inputs.to(teacher_device))
            features = features.to(run.device)  # (B, D)
        if table is None:
            table = torch.empty(len(dataset), features.shape[-1], dtype=features.dtype, device=run.device)
        table[index] = features[:len(index)]
    return table


def mlm_training_loss(student: MLMWithFeature, masked_ids, labels, attention_mask, input_ids, teacher_cls,
                      num_masked, distill_weight: float):
    """L = L_MLM(student; masked text) + λ · distill_loss(h_S(x), h_T(x)) on one batch of text: masked_ids, labels,
    attention_mask, input_ids (the unmasked text) (B, L); teacher_cls (B, D) the frozen teacher's h_T(x);
    num_masked: Run.token_mean_divisor. -> (loss, the terms to log)."""
    mlm, student_cls = student(masked_ids, labels, input_ids, attention_mask, num_masked)  # scalar, (B, D)
    distill = distill_loss(student_cls, teacher_cls)
    return mlm + distill_weight * distill, {"mlm_loss": mlm, "distill_loss": distill}


def main(args):
    kind = text_common.run_modality(args)
    text_common.resolve_defaults(args, kind, "mlm")  # the flags not given: the image or the text recipe's values
    if kind == "text":
        return main_text(args)
    out_dir = args.output_dir or self_distill_dir(args.checkpoint_dir, args.steps, args.dataset)
    teacher_path = args.teacher or further_pretrain_dir(args.checkpoint_dir, args.steps, args.dataset)
    preprocessing = preprocessing_of(args.model_name)  # θ₀'s image processor, as in the release
    reads = {"θ₀": WeightsInput(args.model_name), "teacher": WeightsInput(teacher_path),
             "train split": SplitInput(args.dataset, "train", args.data_dir)}
    run = training.Run(args, out_dir, "self-distill", os.path.join(out_dir, "model.safetensors"), preprocessing,
                       reads=reads)
    if run.already_done:  # even if its teacher has been deleted since
        return
    if not has_checkpoint(teacher_path):
        raise teacher_missing(teacher_path, args)

    # ---- student: θ₀ again (encoder + decoder); teacher: the further pre-trained encoder, frozen
    student_mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)  # sin-cos tables frozen
    teacher = load_encoder(teacher_path, args.model_name, reference=student_mae.config)
    teacher_device = training.resolve_device(args.teacher_device, run.local_rank) if args.teacher_device else run.device
    teacher.to(teacher_device).eval().requires_grad_(False)
    preprocessing = preprocessing.check(student_mae.config.image_size)
    dataset = ImageDataset(args.dataset, "train", args.data_dir, preprocessing.size, preprocessing.resample)
    num_patches = student_mae.vit.embeddings.patch_embeddings.num_patches

    # ---- optimizer: as in further pre-training
    optimizer, scheduler = run.adamw(student_mae, no_weight_decay, MAE_BETAS)
    student = run.prepare(MAEWithFeature(student_mae), optimizer, scheduler)

    # ---- the frozen teacher's h_T(x), once per training image (no augmentation: it never changes)
    teacher_table = teacher_features(teacher, teacher_device, run, dataset)  # (N, D) on run.device

    # ---- MAE + distillation, one backward pass for both terms
    student.train()

    @run.graphed  # --cuda_graph: this step captured whole in one CUDA graph (training/cuda_graph.py)
    def train_step(step, images, noise, teacher_cls):
        for micro in run.micro_batches(images, noise, teacher_cls):  # --accum_steps K: K slices of the batch
            with run.forward(step):  # autocast; dropout seeded from (seed, step); DDP syncs after the last slice
                loss, terms = training_loss(student, *micro, distill_weight=args.distill_weight)
            run.backward(loss, terms)  # scaled by 1/K: the K gradients sum to the batch's
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, (images, _, index) in run.batches(dataset):
        noise = run.masking_noise(step, num_patches)  # (B, N), the same masks as stage 1 would draw
        train_step(step, images, noise, teacher_table[index])

    if run.is_main:
        save_model(student_mae, out_dir, preprocessing, card=model_card(out_dir))  # the card travels with the weights
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[self-distill] saved {out_dir}")


def teacher_missing(teacher_path: str, args) -> utils.UserError:
    command = creating_command(paper.teacher(args.steps), args.dataset, args.checkpoint_dir)
    return utils.UserError(f"teacher not found: {teacher_path} (create it with `{command}`, or pass --teacher PATH)")


def main_text(args):
    """Stage 2 on text: the student θ₀ (a RoBERTa) trained with MLM + matching the frozen teacher's `<s>`."""
    out_dir = args.output_dir or self_distill_dir(args.checkpoint_dir, args.steps, args.dataset)
    teacher_path = args.teacher or further_pretrain_dir(args.checkpoint_dir, args.steps, args.dataset)
    reads = {"θ₀": WeightsInput(args.model_name), "teacher": WeightsInput(teacher_path),
             "train split": SplitInput(args.dataset, "train", args.data_dir)}
    run = training.Run(args, out_dir, "self-distill", os.path.join(out_dir, "model.safetensors"), None, reads=reads)
    if run.already_done:  # even if its teacher has been deleted since
        return
    if not has_checkpoint(teacher_path):
        raise teacher_missing(teacher_path, args)

    # ---- student: θ₀ again (encoder + LM head); teacher: the further pre-trained encoder, frozen
    student_mlm, tokenizer = load_mlm(args.model_name), load_tokenizer(args.model_name)
    teacher = load_mlm(teacher_path).roberta
    check_same_architecture(teacher.config, student_mlm.config, f"teacher '{teacher_path}'")
    teacher_device = training.resolve_device(args.teacher_device, run.local_rank) if args.teacher_device else run.device
    teacher.to(teacher_device).eval().requires_grad_(False)
    texts = text_common.tokenized(TextSplit(args.dataset, "train", args.data_dir), tokenizer,
                                  args.max_length)

    # ---- optimizer: as in further pre-training
    optimizer, scheduler = run.adamw(student_mlm, text_common.no_weight_decay, text_common.MLM_BETAS,
                                     eps=text_common.MLM_EPS)
    student = run.prepare(MLMWithFeature(student_mlm), optimizer, scheduler)

    # ---- the frozen teacher's h_T(x), once per training text (the unmasked text never changes)
    teacher_table = teacher_features(teacher, teacher_device, run, texts)  # (N, D) on run.device

    # ---- MLM + distillation, one backward pass for both terms
    student.train()

    def train_step(step, masked_ids, labels, attention_mask, input_ids, teacher_cls, num_masked):
        for micro in run.micro_batches(masked_ids, labels, attention_mask, input_ids, teacher_cls):  # K slices
            with run.forward(step):  # autocast; dropout seeded from (seed, step); DDP syncs after the last slice
                loss, terms = mlm_training_loss(student, *micro, num_masked, distill_weight=args.distill_weight)
            run.backward(loss, terms)  # scaled by 1/K
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, ((input_ids, attention_mask), _, index) in run.batches(texts):
        masked_ids, labels = text_common.draw_mlm_masks(run, step, input_ids, attention_mask, tokenizer,
                                                        args.mask_ratio, args.max_length)  # as stage 1 draws them
        train_step(step, masked_ids, labels, attention_mask, input_ids, teacher_table[index],
                   run.token_mean_divisor((labels != -100).sum()))

    if run.is_main:
        save_model(student_mlm, out_dir, card=model_card(out_dir), tokenizer=tokenizer)
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[self-distill] saved {out_dir}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
