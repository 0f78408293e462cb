"""Probes of a frozen encoder: a linear probe (MAE's protocol) or a weighted k-NN classifier (DINO's), from θ₀
(`--scratch True`) or a checkpoint of stage 1 or 2 (`--scratch False --ckpt_name NAME`, read from
<checkpoint_dir>/<NAME>/<dataset>), as fine-tuning reads them.

Both read h(x), the CLS token of the last layer after the final LayerNorm on the unmasked image (models.cls_feature),
computed once per split with the encoder in eval mode and kept in memory.

    linear  BatchNorm without affine parameters, then a linear layer, trained on the training features with the
            run's seeded draws (data order, head initialisation) and AdamW; test accuracy and loss after the last step.
            MAE trains this head with LARS on a batch of 16384 for 90 epochs; on cached features AdamW with a linear
            warmup and decay, no weight decay, is the default here (--steps/--batch_size/--lr/--warmup_steps).
    knn     cosine similarity of the L2-normalised test features to every training feature, the --knn_k most
            similar vote for their class with weight exp(similarity / --knn_temperature), the heaviest class wins.
            Nothing is trained: one run, no seed.

    python probe.py --dataset cub --seed 1                                # linear, from the self-distilled model
    python probe.py --dataset cub --probe knn --ckpt_name further-pretrain-20000
    python probe.py --dataset digits --probe knn --scratch True --model_name vit-mae-tiny --device cpu

Writes <results_dir>/<dataset>/<init>/probe-linear-seed<k>.json (test_acc, test_loss, train_acc, train_loss, the
run's arguments) with the run's record and metrics in probe-linear-seed<k>/, or probe-knn.json with its record in
probe-knn/; <init> is `initial` or NAME. The file names keep them out of the fine-tuning table (seed<k>.json);
report.py shows them in tables of their own.
"""
import argparse
import os

import torch
import torch.nn.functional as F
from torch import nn

import outputs
import text_common
import training
import utils
from data import ImageDataset, check_labels
from data.identity import SplitInput
from finetune import check_ckpt_name
from mae_common import creating_command
from models import build_encoder, cls_feature, has_checkpoint, preprocessing_of, start_encoder_state
from models.identity import WeightsInput
from outputs.plots import plot_metrics

PROBE_BETAS = (0.9, 0.999)
BN_EPS = 1e-6  # MAE's linear probe
HEAD_INIT_STD = 0.01  # MAE's linear probe: truncated normal weights, zero bias
# Flags only one probe uses: recorded as their defaults in the other, so that a launcher passing them to both
# (a seed loop over k-NN) finds the finished run instead of a run "with other arguments".
TRAINING_FLAGS = ("seed", "steps", "lr", "weight_decay", "warmup_steps", "clip_grad", "save_every",
                  "save_every_minutes", "cuda_graph")
KNN_FLAGS = ("knn_k", "knn_temperature")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear probe or weighted k-NN on a frozen encoder's features.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                parents=[utils.shared_parser()], allow_abbrev=False)
    g = p.add_argument_group("probe")
    g.add_argument("--probe", default="linear", choices=["linear", "knn"],
                   help="linear: BatchNorm (no affine) + linear layer trained on the features (MAE's protocol, "
                        "seeded); knn: weighted k-NN on the L2-normalised features (DINO's; nothing trained, no seed)")
    g.add_argument("--scratch", type=utils.str2bool, default=False,
                   help="True: probe --model_name (θ₀); False: <checkpoint_dir>/<ckpt_name>/<dataset>")
    g.add_argument("--ckpt_name", default="self-further-pretrain-20000",
                   help="checkpoint to probe when --scratch False, e.g. further-pretrain-20000")
    g.add_argument("--knn_k", type=utils.int_at_least(1), default=20, help="k-NN: neighbours that vote (DINO: 20)")
    g.add_argument("--knn_temperature", type=utils.finite_float(0, low_open=True), default=0.07,
                   help="k-NN: a neighbour's vote is exp(cosine similarity / T) (DINO: 0.07)")
    g.add_argument("--results_dir", default="results",
                   help="where results/<dataset>/<init>/probe-linear-seed<k>.json and probe-knn.json go")
    # sized for a linear layer on cached features: about 85 epochs of CUB's 5,994 training images (MAE: 90)
    p.set_defaults(steps=2000, batch_size=256, lr=1e-3, weight_decay=0.0, warmup_steps=200)
    return p


def no_weight_decay(name: str, param) -> bool:
    """None: --weight_decay (0 by default, as in MAE's linear probe) applies to the linear layer's weight and bias
    alike; the BatchNorm has no parameters."""
    return False


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    """MAE's linear-probe head: BatchNorm1d without affine parameters (it only standardises the features), then
    a linear layer, weights N(0, 0.01²) truncated, bias 0. Draws from the global generator (the run seeds it)."""
    linear = nn.Linear(dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=HEAD_INIT_STD)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=BN_EPS), linear)


@torch.no_grad()
def features(encoder, run: training.Run, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """(h(x) of every image of `dataset` (N, D) in float32, its labels (N,)), both on run.device: the encoder in
    eval mode, the unmasked image, under the run's autocast, in batches of --batch_size."""
    encoder.eval()
    table = None
    for index, images in run.ordered_batches(dataset):
        with torch.inference_mode(), run.autocast():
            h = cls_feature(encoder, images).float()  # (B, D)
        if table is None:
            table = torch.empty(len(dataset), h.shape[-1], device=run.device)
        table[index] = h[:len(index)]
    return table, torch.as_tensor(dataset.reader.labels(), device=run.device)


def knn_predict(train_features, train_labels, test_features, num_classes: int, k: int, temperature: float,
                chunk: int = 256) -> torch.Tensor:
    """DINO's weighted k-NN: for each test feature, the k training features of highest cosine similarity s vote for
    their class with weight exp(s / temperature); the class with the largest summed vote (the first on a tie).
    (N, D), (N,), (M, D) -> (M,) predicted classes. Features need not be normalised: they are L2-normalised here."""
    bank = F.normalize(train_features.float(), dim=-1)
    predictions = []
    for queries in F.normalize(test_features.float(), dim=-1).split(chunk):
        similarity, neighbours = (queries @ bank.T).topk(k, dim=-1)  # (B, k) each
        votes = torch.zeros(len(queries), num_classes, device=queries.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        predictions.append(votes.argmax(dim=-1))
    return torch.cat(predictions)


def training_loss(head, features, labels):
    """Cross-entropy of the probe on one batch of features (B, D), labels (B,). -> (loss, the terms to log)."""
    loss = F.cross_entropy(head(features).float(), labels)
    return loss, {"cls_loss": loss}


@torch.no_grad()
def evaluate(head, features, labels, batch: int) -> dict:
    """Accuracy and mean cross-entropy of the probe (eval mode: BatchNorm's running statistics) on all features."""
    head.eval()
    correct = loss_sum = 0.0
    for x, y in zip(features.split(batch), labels.split(batch)):
        logits = head(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == y).sum().item()
    return {"acc": correct / len(labels), "loss": loss_sum / len(labels)}


def main(args):
    if text_common.run_modality(args) == "text":
        raise utils.UserError(f"probe.py probes image encoders (the CLS feature of a ViT-MAE); '{args.dataset}' is a "
                              f"text dataset: compare text checkpoints with finetune.py")
    text_common.resolve_defaults(args, "image")  # the flags not given: the parser's values, plain
    if args.accum_steps > 1:  # micro-batches would each normalise with their own statistics
        raise utils.UserError("the linear probe's BatchNorm normalises with the statistics of the whole batch: "
                              "--accum_steps does not apply to probe.py (its features are cached; lower "
                              "--batch_size instead)")
    if not args.scratch:
        check_ckpt_name(args.ckpt_name)
    defaults = get_args_parser()
    unused = (("ckpt_name", "checkpoint_dir") if args.scratch else ()) + \
        (TRAINING_FLAGS if args.probe == "knn" else KNN_FLAGS)
    for name in unused:  # recorded as the defaults, so that runs passing other values agree
        setattr(args, name, defaults.get_default(name))
    init = "initial" if args.scratch else args.ckpt_name
    name = f"probe-linear-seed{args.seed}" if args.probe == "linear" else "probe-knn"
    out_dir = args.output_dir or os.path.join(args.results_dir, args.dataset, init, name)
    result_path = os.path.normpath(out_dir) + ".json"
    checkpoint = args.model_name if args.scratch else os.path.join(args.checkpoint_dir, args.ckpt_name, args.dataset)
    preprocessing = preprocessing_of(checkpoint, args.model_name)  # what the checkpoint was trained with
    reads = {"start": WeightsInput(checkpoint), **{f"{split} split": SplitInput(args.dataset, split, args.data_dir)
                                                   for split in ("train", "test")}}
    run = training.Run(args, out_dir, f"probe-{args.probe}", result_path, preprocessing, done_holds_record=True,
                       reads=reads)
    if run.already_done:
        return
    if not args.scratch and not has_checkpoint(checkpoint):
        raise utils.UserError(f"checkpoint not found: {checkpoint} (create it with "
                              f"`{creating_command(args.ckpt_name, args.dataset, args.checkpoint_dir)}`, "
                              f"or probe θ₀: probe.py with --scratch True)")

    # ---- the frozen encoder and the data
    config, encoder_state = start_encoder_state(args.scratch, checkpoint, args.model_name)
    encoder = build_encoder(config, encoder_state).requires_grad_(False)
    preprocessing = preprocessing.check(config.image_size)
    train_set = ImageDataset(args.dataset, "train", args.data_dir, preprocessing.size, preprocessing.resample)
    test_set = ImageDataset(args.dataset, "test", args.data_dir, preprocessing.size, preprocessing.resample)
    num_classes = check_labels(train_set, test_set)
    if args.probe == "knn" and args.knn_k > len(train_set):
        raise utils.UserError(f"--knn_k {args.knn_k} is more than the {len(train_set)} training images of "
                              f"{args.dataset}; pass a smaller --knn_k")
    result = {"probe": args.probe, "dataset": args.dataset, "init": init, "checkpoint": checkpoint,
              "num_test": len(test_set), "num_train": len(train_set)}

    if args.probe == "knn":
        # ---- weighted k-NN: the training features are the bank
        encoder = run.prepare_frozen(encoder)  # lock the directory, write the record
        train_features, train_labels = features(encoder, run, train_set)  # (N, D), (N,)
        test_features, test_labels = features(encoder, run, test_set)
        predicted = knn_predict(train_features, train_labels, test_features, num_classes, args.knn_k,
                                args.knn_temperature)
        test = {"acc": (predicted == test_labels).float().mean().item()}
        result.update(test_acc=test["acc"], knn_k=args.knn_k, knn_temperature=args.knn_temperature)
    else:
        # ---- linear probe: BatchNorm + linear head (initialised from the run's seed), AdamW on cached features
        head = probe_head(config.hidden_size, num_classes)
        optimizer, scheduler = run.adamw(head, no_weight_decay, PROBE_BETAS)
        probe = run.prepare(head, optimizer, scheduler)
        encoder.to(run.device)
        train_features, train_labels = features(encoder, run, train_set)  # once; (N, D), (N,)
        test_features, test_labels = features(encoder, run, test_set)
        probe.train()

        @run.graphed  # --cuda_graph: this step captured whole in one CUDA graph (training/cuda_graph.py)
        def train_step(step, x, y):
            with run.forward(step):
                loss, terms = training_loss(probe, x, y)
            run.backward(loss, terms)
            run.step(step)  # clip, AdamW, schedule, non-finite check; log, save

        for step in range(run.start_step, args.steps):
            index = run.draws.indices(len(train_set), step)  # (B,) the run's seeded data order
            train_step(step, train_features[index], train_labels[index])

        # ---- evaluation, once, after the last step
        test = evaluate(head, test_features, test_labels, args.batch_size)
        fit = evaluate(head, train_features, train_labels, args.batch_size)
        result.update(test_acc=test["acc"], test_loss=test["loss"], train_acc=fit["acc"], train_loss=fit["loss"],
                      seed=args.seed)
    if run.is_main:
        outputs.write_json(result_path, {**result, **run.record()})  # the result marks the run done
        if args.plot and args.probe == "linear":
            plot_metrics(run.metrics_path, os.path.join(out_dir, "loss_curves.png"))
    run.finish()
    run.print(f"[probe-{args.probe}] {args.dataset} from {init}: test accuracy {100 * test['acc']:.2f}% "
              f"-> {result_path}")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
