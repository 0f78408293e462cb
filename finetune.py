"""Stage 3 — fine-tuning: a linear classifier on the CLS token, trained with labels.

The encoder comes from the initial model θ₀ (`--scratch True`), or from a checkpoint of stage 1
or 2 (`--scratch False --ckpt_name NAME`, read from <checkpoint_dir>/<NAME>/<dataset>). After the
last step the test accuracy and loss, and the accuracy and loss on the training images (eval mode, without the
held-out --val_split part), are printed and written to a results file.

    python finetune.py --dataset cub                                  # from the self-distilled model
    python finetune.py --dataset cub --ckpt_name further-pretrain-20000
    python finetune.py --dataset cub --scratch True                   # from θ₀
    bash run_finetune.sh 0 cub                                        # 5 seeds, then mean ± std
    python finetune.py --dataset cub --recipe mae                     # MAE's fine-tuning recipe instead

Writes results/<dataset>/<init>/seed<k>.json (test_acc, test_loss, train_acc, train_loss and the run's arguments)
and the run's record and metrics in results/<dataset>/<init>/seed<k>/; <init> is `initial` or NAME. With
--save_model also the classifier, in results/<dataset>/<init>/seed<k>/model/ (stock from_pretrained). A recipe other
than the paper's (--recipe mae: layer decay, drop path, RandAugment, random erasing, mixup / cutmix, label smoothing,
a cosine schedule; training/mae_recipe.py) writes to results/<dataset>/<init>/recipe-<name>/ instead: another row.

On a text dataset the classifier is RoBERTa's (RobertaForSequenceClassification: `<s>` of the last layer through a
dense tanh layer, then a linear layer), its encoder from a RoBERTa θ₀ or a text checkpoint, trained with the text
recipe's defaults (text_common.py: batch 16, lr 2e-5, 10 epochs, ...); the result also holds macro-F1 and micro-F1
(test_macro_f1, test_micro_f1, and on the training texts), and --save_model saves the tokenizer beside the model:

    python finetune.py --dataset chemprot --ckpt_name further-pretrain-20000
"""
import argparse
import os

import torch
import torch.nn.functional as F

import outputs
import text_common
import training
import utils
from data import ImageDataset, check_labels
from data.identity import SplitInput
from data.text import TextSplit
from mae_common import creating_command
from models import (build_classifier, build_text_classifier, has_checkpoint, load_mlm, load_tokenizer,
                    preprocessing_of, save_model, start_encoder_state, text_encoder_state)
from models.identity import WeightsInput
from outputs.card import model_card
from outputs.plots import plot_metrics
from training import mae_recipe

FINETUNE_BETAS = (0.9, 0.999)
NO_DECAY_NAMES = ("bias", "position_embeddings", "cls_token")  # the release's rule; LayerNorm weights decay
VAL_SPLIT_SEED = 0  # the held-out part is the same for every seed and every init


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Fine-tuning a classifier from θ₀ or a checkpoint (stage 3).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                parents=[utils.shared_parser()], allow_abbrev=False)
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--scratch", type=utils.str2bool, default=False,
                   help="True: start from --model_name (θ₀); False: from <checkpoint_dir>/<ckpt_name>/<dataset>")
    g.add_argument("--ckpt_name", default="self-further-pretrain-20000",
                   help="checkpoint to start from when --scratch False, e.g. further-pretrain-20000")
    g.add_argument("--dropout", type=utils.finite_float(0, 1, high_open=True), default=0.1,
                   help="dropout on the hidden states")
    g.add_argument("--val_split", type=utils.finite_float(0, 1, high_open=True), default=0.0,
                   help="fraction of the training set held out for validation (0: none, as in the paper)")
    g.add_argument("--results_dir", default="results", help="where results/<dataset>/<init>/seed<k>.json go")
    g.add_argument("--save_model", action="store_true",
                   help="also save the trained classifier (ViTForImageClassification, or for text "
                        "RobertaForSequenceClassification with its tokenizer; with its label names, "
                        "preprocessing and model card) in the run's folder, "
                        "<results_dir>/<dataset>/<init>/seed<k>/model/; "
                        "off by default: a ViT-Base classifier is about 330 MB per run")
    g = p.add_argument_group("MAE's fine-tuning recipe (each piece off in the paper's; training/mae_recipe.py)")
    release, mae = mae_recipe.RECIPES["release"], mae_recipe.RECIPES["mae"]
    g.add_argument("--recipe", default="release", choices=sorted(mae_recipe.RECIPES),
                   help="release: the paper's fine-tuning; mae: MAE's (ViT-B, FINETUNE.md): the defaults of the flags "
                        "below and --weight_decay become MAE's values (a flag given wins), no weight decay on 1-D "
                        "tensors, position embeddings and cls token, results in <init>/recipe-mae/")
    fraction = utils.finite_float(0, 1)
    g.add_argument("--layer_decay", type=utils.finite_float(0, 1, low_open=True), default=mae_recipe.not_given(
        release["layer_decay"]), help=f"layer-wise lr decay: block i of L trains at lr · layer_decay^(L+1-i), the "
                                      f"embeddings at i=0 (1: off; mae: {mae['layer_decay']})")
    g.add_argument("--drop_path", type=utils.finite_float(0, 1, high_open=True),
                   default=mae_recipe.not_given(release["drop_path"]),
                   help=f"stochastic depth on each block's residual branches, rising linearly to this rate in the last "
                        f"block (mae: {mae['drop_path']})")
    g.add_argument("--mixup", type=utils.finite_float(0), default=mae_recipe.not_given(release["mixup"]),
                   help=f"mixup's Beta(α, α) α; 0: off (mae: {mae['mixup']}); with --cutmix, one of the two a "
                        f"step")
    g.add_argument("--cutmix", type=utils.finite_float(0), default=mae_recipe.not_given(release["cutmix"]),
                   help=f"cutmix's Beta(α, α) α; 0: off (mae: {mae['cutmix']})")
    g.add_argument("--label_smoothing", type=utils.finite_float(0, 1, high_open=True),
                   default=mae_recipe.not_given(release["label_smoothing"]),
                   help=f"label smoothing of the targets (mae: {mae['label_smoothing']})")
    g.add_argument("--reprob", type=fraction, default=mae_recipe.not_given(release["reprob"]),
                   help=f"random erasing: probability of erasing one rectangle of an image, filled with noise "
                        f"(mae: {mae['reprob']})")
    g.add_argument("--randaug", default=mae_recipe.not_given(release["randaug"]),
                   help=f"RandAugment, a timm rand-augment string, or none (mae: {mae['randaug']})")
    g.add_argument("--schedule", default=mae_recipe.not_given(release["schedule"]), choices=["linear", "cosine"],
                   help=f"after the linear warmup: linear or half-cosine decay to 0 (mae: {mae['schedule']})")
    p.set_defaults(steps=utils.not_given(10000), batch_size=utils.not_given(32), lr=utils.not_given(1e-4),
                   warmup_steps=utils.not_given(500), clip_grad=1.0,
                   weight_decay=mae_recipe.not_given(release["weight_decay"]))
    return p


def no_weight_decay(name: str, param) -> bool:
    """The release's rule: no weight decay on names containing bias, position_embeddings or cls_token
    (LayerNorm weights are decayed)."""
    return any(n in name for n in NO_DECAY_NAMES)


def label_names(dataset: ImageDataset, num_classes: int) -> list[str]:
    """Class names for the saved classifier's id2label: an image folder's class folders, else the "classes"
    that `python -m data.prepare` stores in counts.json, else the class index as a string."""
    names = getattr(dataset.reader, "classes", None)  # image folders
    if names is None and dataset.counts is not None:  # read and checked when the dataset was opened
        names = dataset.counts.get("classes")
    if not isinstance(names, list) or len(names) != num_classes:
        names = [str(label) for label in range(num_classes)]
    return [str(name) for name in names]


def name_labels(model, names: list[str]) -> None:
    """The saved classifier's id2label / label2id: a pipeline then answers with the class names."""
    model.config.id2label = dict(enumerate(names))
    model.config.label2id = {name: label for label, name in enumerate(names)}


def train_val_split(n: int, val_split: float) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices) of n images: round(n · val_split) held out, the same ones for
    every seed. Neither part may be empty (the held-out part only when val_split > 0)."""
    if not 0.0 <= val_split < 1.0:
        raise utils.UserError(f"--val_split must be in [0, 1), got {val_split}")
    n_val = round(n * val_split)
    if n_val == n:
        raise utils.UserError(f"--val_split {val_split} holds out all {n} training images, leaving none to train "
                              f"on; use a smaller fraction")
    if val_split > 0 and n_val == 0:
        raise utils.UserError(f"--val_split {val_split} holds out none of the {n} training images; use a fraction "
                              f"of at least {1 / n:.2g}, or 0 for no held-out part")
    order = torch.randperm(n, generator=utils.generator(VAL_SPLIT_SEED, utils.STREAM_SPLIT, 0)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def training_loss(classifier, images, labels, flip):
    """Cross-entropy on one batch, each image horizontally flipped where `flip` (B,) is True (the paper's only
    augmentation). images (B, 3, H, W) normalised, labels (B,), or (B, classes) soft targets: the mixed or
    smoothed labels of the MAE recipe's mixup / label smoothing (training/mae_recipe.py). -> (loss, terms to log)."""
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    logits = classifier(images).logits  # (B, classes)
    if labels.is_floating_point():
        loss = mae_recipe.soft_target_loss(logits.float(), labels)
    else:
        loss = F.cross_entropy(logits.float(), labels)
    return loss, {"cls_loss": loss}


@torch.no_grad()
def evaluate(model, run: training.Run, dataset) -> dict:
    """Accuracy and mean cross-entropy over the whole dataset (summed over processes)."""
    model.eval()
    correct = loss_sum = 0.0
    for images, labels in run.eval_batches(dataset):
        with run.autocast():
            logits = model(images).logits
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
    correct, loss_sum = run.all_reduce_sum([correct, loss_sum])
    return {"acc": correct / len(dataset), "loss": loss_sum / len(dataset)}


def check_ckpt_name(name: str) -> None:
    """--ckpt_name names a checkpoint below --checkpoint_dir, and the results folder below --results_dir/<dataset>
    (a slash is fine: `ablation/further-pretrain-100`). An absolute path or a `..` left those folders: the
    results and run directory landed in the checkpoint tree."""
    if name and not os.path.isabs(name) and ".." not in name.replace(os.sep, "/").split("/"):
        return
    parent, base = os.path.split(os.path.normpath(name)) if name else ("", "")
    raise utils.UserError(f"--ckpt_name {name!r} {'is a path' if name else 'is empty'}, but it names a checkpoint "
                          f"below --checkpoint_dir "
                          f"(read from <checkpoint_dir>/<ckpt_name>/<dataset>, results in <results_dir>/"
                          f"<dataset>/<ckpt_name>/): pass --checkpoint_dir {parent or 'DIR'} --ckpt_name "
                          f"{base or 'NAME'}")


def where(args) -> tuple[str, str, str, str]:
    """(init, the run directory, its result file, the checkpoint read): init is `initial` or --ckpt_name."""
    if not args.scratch:
        check_ckpt_name(args.ckpt_name)
    if args.scratch:  # no checkpoint is read; recorded as the defaults, so launchers passing other values agree
        defaults = get_args_parser()
        args.ckpt_name, args.checkpoint_dir = defaults.get_default("ckpt_name"), defaults.get_default("checkpoint_dir")
    init = "initial" if args.scratch else args.ckpt_name
    out_dir = args.output_dir or os.path.join(args.results_dir, args.dataset, init, mae_recipe.recipe_dir(args.recipe),
                                              f"seed{args.seed}")
    checkpoint = args.model_name if args.scratch else os.path.join(args.checkpoint_dir, args.ckpt_name, args.dataset)
    return init, out_dir, os.path.normpath(out_dir) + ".json", checkpoint


def start_run(args, out_dir: str, result_path: str, checkpoint: str, preprocessing) -> training.Run:
    """The fine-tuning run; its record fingerprints the weights it starts from and the two splits it reads."""
    reads = {"start": WeightsInput(checkpoint), **{f"{split} split": SplitInput(args.dataset, split, args.data_dir)
                                                   for split in ("train", "test")}}
    return training.Run(args, out_dir, "finetune", result_path, preprocessing, done_holds_record=True, reads=reads)


def check_checkpoint(args, checkpoint: str) -> None:
    if not args.scratch and not has_checkpoint(checkpoint):
        raise utils.UserError(f"checkpoint not found: {checkpoint} (create it with "
                              f"`{creating_command(args.ckpt_name, args.dataset, args.checkpoint_dir)}`, "
                              f"or fine-tune from θ₀: `bash run_finetune.sh GPU {args.dataset} True`, "
                              f"or finetune.py with --scratch True)")


def main(args):
    kind = text_common.run_modality(args)
    if kind == "text":
        return main_text(args)
    mae_recipe.resolve_recipe(args)  # the recipe's values for the pieces not given, before anything is recorded
    text_common.resolve_defaults(args, kind, "finetune")  # the other flags not given: the parser's values
    init, out_dir, result_path, checkpoint = where(args)
    preprocessing = preprocessing_of(checkpoint, args.model_name)  # what the checkpoint was trained with
    run = start_run(args, out_dir, result_path, checkpoint, preprocessing)
    if run.already_done:  # even if its checkpoint has been deleted since
        return
    check_checkpoint(args, checkpoint)

    # ---- the encoder to start from, and the data: train (optionally minus a held-out part) and test
    config, encoder_state = start_encoder_state(args.scratch, checkpoint, args.model_name)
    preprocessing = preprocessing.check(config.image_size)
    full_train = ImageDataset(args.dataset, "train", args.data_dir, preprocessing.size, preprocessing.resample)
    test_set = ImageDataset(args.dataset, "test", args.data_dir, preprocessing.size, preprocessing.resample)
    check_labels(full_train, test_set)  # a label out of range fails here, not deep inside cross-entropy
    train_idx, val_idx = train_val_split(len(full_train), args.val_split)
    train_set = torch.utils.data.Subset(full_train, train_idx)

    # ---- model: the checkpoint's encoder + a new linear head; AdamW, layer-wise lr decay with --layer_decay
    model = build_classifier(config, encoder_state, full_train.num_classes(), args.dropout, args.drop_path,
                             run.process.rank, run.process.world, seed=args.seed)  # the head: from --seed alone
    no_decay = mae_recipe.mae_no_weight_decay if args.recipe == "mae" else no_weight_decay
    groups = (mae_recipe.layer_decay_groups(model, args.lr, args.weight_decay, no_decay, args.layer_decay)
              if args.layer_decay != 1 else None)
    optimizer, scheduler = run.adamw(model, no_decay, FINETUNE_BETAS, groups, mae_recipe.SCHEDULES[args.schedule])
    classifier = run.prepare(model, optimizer, scheduler)

    # ---- supervised training: horizontal flip (the paper's only augmentation); the MAE recipe's pieces if asked
    pieces = mae_recipe.Pieces.from_flags(vars(args))
    mae_recipe.check_mix_batch(pieces, args.batch_size, run.process.local_batch(args.batch_size), args.accum_steps)
    augment = mae_recipe.Augment(pieces, args.seed, run.data.mean, run.data.std, run.process.rank,
                                 full_train.num_classes(), config.image_size)
    classifier.train()

    @run.graphed  # --cuda_graph: this step captured whole in one CUDA graph (training/cuda_graph.py)
    def train_step(step, images, labels, flip):
        for micro in run.micro_batches(images, labels, flip):  # --accum_steps K: K slices of the batch and its flips
            with run.forward(step):  # autocast; dropout: these rows' masks, from (seed, step); DDP syncs at the last
                loss, terms = training_loss(classifier, *micro)
            run.backward(loss, terms)  # scaled by 1/K: the K gradients sum to the batch's
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, (images, labels, _) in run.batches(train_set):
        flip = run.global_rand(step, utils.STREAM_FLIP) < 0.5  # (B,), a function of (seed, step, sample)
        images, labels = augment(step, images, labels)  # RandAugment, erasing, mixup / cutmix, smoothing; else as is
        train_step(step, images, labels, flip)

    # ---- evaluation, once, after the last step: the test split, and (eval mode, no flip) the images trained on,
    # to tell a classifier that does not fit its training set from one that fits and does not generalise
    test = evaluate(model, run, test_set)
    fit = evaluate(model, run, train_set)
    result = {"test_acc": test["acc"], "test_loss": test["loss"], "train_acc": fit["acc"], "train_loss": fit["loss"],
              "dataset": args.dataset, "init": init, "seed": args.seed, "checkpoint": checkpoint,
              "num_test": len(test_set), "num_train": len(train_set)}
    if val_idx:
        val = evaluate(model, run, torch.utils.data.Subset(full_train, val_idx))
        result.update(val_acc=val["acc"], val_loss=val["loss"], num_val=len(val_idx))
    if run.is_main:
        if args.save_model:  # before the result file, which marks the run done
            names = label_names(full_train, model.config.num_labels)
            name_labels(model, names)
            model_dir = os.path.join(out_dir, "model")
            save_model(model, model_dir, preprocessing, card=model_card(model_dir, result))  # card: every seed
            result["model"] = model_dir
        # the result before finish() drops the state: a kill in between loses nothing
        outputs.write_json(result_path, {**result, **run.record()})
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[finetune] {args.dataset} from {init}, seed {args.seed}: test accuracy {100 * test['acc']:.2f}% "
              f"loss {test['loss']:.4f} (training set {100 * fit['acc']:.2f}%, loss {fit['loss']:.4f}) "
              f"-> {result_path}")


def text_training_loss(classifier, input_ids, attention_mask, labels):
    """Cross-entropy of RoBERTa's classifier on one batch of text: (B, L) input_ids and attention_mask, (B,)
    labels. -> (loss, terms to log)."""
    logits = classifier(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, classes)
    loss = F.cross_entropy(logits.float(), labels)
    return loss, {"cls_loss": loss}


@torch.no_grad()
def evaluate_text(model, run: training.Run, dataset) -> dict:
    """Accuracy, mean cross-entropy, macro-F1 (the mean over the classes present in the labels or the predictions of
    each class's F1, as scikit-learn's f1_score) and micro-F1 (over all decisions: accuracy, for one label a text)
    over the whole dataset, summed over processes."""
    model.eval()
    classes = model.config.num_labels
    true_pos, predicted, actual = (torch.zeros(classes, dtype=torch.float64) for _ in range(3))
    loss_sum = 0.0
    for (input_ids, attention_mask), labels in run.eval_batches(dataset):
        with run.autocast():
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        guess, labels = logits.argmax(dim=-1).cpu(), labels.cpu()
        true_pos += torch.bincount(labels[guess == labels], minlength=classes)
        predicted += torch.bincount(guess, minlength=classes)
        actual += torch.bincount(labels, minlength=classes)
    totals = torch.tensor(run.all_reduce_sum([loss_sum, *true_pos.tolist(), *predicted.tolist(), *actual.tolist()]))
    loss_sum, (true_pos, predicted, actual) = totals[0].item(), totals[1:].view(3, classes)
    present = (predicted + actual) > 0
    f1 = 2 * true_pos[present] / (predicted + actual)[present]
    return {"acc": true_pos.sum().item() / len(dataset), "loss": loss_sum / len(dataset),
            "macro_f1": f1.mean().item(), "micro_f1": true_pos.sum().item() / actual.sum().item()}


def main_text(args):
    """Stage 3 on text: RoBERTa's classification head on `<s>`, the encoder from θ₀ or a text checkpoint."""
    full_texts = TextSplit(args.dataset, "train", args.data_dir)
    test_texts = TextSplit(args.dataset, "test", args.data_dir)
    train_idx, val_idx = train_val_split(len(full_texts), args.val_split)
    text_common.resolve_defaults(args, "text", "finetune", len(train_idx))  # steps: 10 epochs
    mae_recipe.resolve_recipe(args)
    text_common.check_image_only_flags(args)
    init, out_dir, result_path, checkpoint = where(args)
    run = start_run(args, out_dir, result_path, checkpoint, None)  # a text model has no image preprocessing
    if run.already_done:  # even if its checkpoint has been deleted since
        return
    check_checkpoint(args, checkpoint)

    # ---- the encoder to start from with its tokenizer, and the texts: train (minus a held-out part) and test
    start, tokenizer = load_mlm(checkpoint), load_tokenizer(checkpoint)
    full_train = text_common.tokenized(full_texts, tokenizer, args.max_length)
    test_set = text_common.tokenized(test_texts, tokenizer, args.max_length)
    train_set = full_train.subset(train_idx)

    # ---- model: the encoder + RoBERTa's new classification head; AdamW with RoBERTa's betas and epsilon
    model = build_text_classifier(start.config, text_encoder_state(start), full_train.num_classes(), args.dropout,
                                  seed=args.seed)  # the head: a function of --seed alone
    optimizer, scheduler = run.adamw(model, text_common.no_weight_decay, text_common.MLM_BETAS,
                                     eps=text_common.MLM_EPS)
    classifier = run.prepare(model, optimizer, scheduler)

    # ---- supervised training
    classifier.train()

    def train_step(step, input_ids, attention_mask, labels):
        for micro in run.micro_batches(input_ids, attention_mask, labels):  # --accum_steps K: K slices of the batch
            with run.forward(step):  # autocast; dropout: these rows' masks, from (seed, step); DDP syncs at the last
                loss, terms = text_training_loss(classifier, *micro)
            run.backward(loss, terms)  # scaled by 1/K
        run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

    for step, ((input_ids, attention_mask), labels, _) in run.batches(train_set):
        train_step(step, input_ids, attention_mask, labels)

    # ---- evaluation, once, after the last step: the test split, and (eval mode) the texts trained on
    test = evaluate_text(model, run, test_set)
    fit = evaluate_text(model, run, train_set)
    result = {"test_acc": test["acc"], "test_loss": test["loss"], "test_macro_f1": test["macro_f1"],
              "test_micro_f1": test["micro_f1"], "train_acc": fit["acc"], "train_loss": fit["loss"],
              "train_macro_f1": fit["macro_f1"], "train_micro_f1": fit["micro_f1"], "modality": "text",
              "dataset": args.dataset, "init": init, "seed": args.seed, "checkpoint": checkpoint,
              "num_test": len(test_set), "num_train": len(train_set)}
    if val_idx:
        val = evaluate_text(model, run, full_train.subset(val_idx))
        result.update(val_acc=val["acc"], val_loss=val["loss"], val_macro_f1=val["macro_f1"],
                      val_micro_f1=val["micro_f1"], num_val=len(val_idx))
    if run.is_main:
        if args.save_model:  # before the result file, which marks the run done
            name_labels(model, full_train.classes)
            model_dir = os.path.join(out_dir, "model")
            save_model(model, model_dir, card=model_card(model_dir, result), tokenizer=tokenizer)
            result["model"] = model_dir
        outputs.write_json(result_path, {**result, **run.record()})  # before finish() drops the state
        if args.plot:
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[finetune] {args.dataset} from {init}, seed {args.seed}: test accuracy {100 * test['acc']:.2f}% "
              f"macro-F1 {100 * test['macro_f1']:.2f} micro-F1 {100 * test['micro_f1']:.2f} loss {test['loss']:.4f} "
              f"(training set {100 * fit['acc']:.2f}%) -> {result_path}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
