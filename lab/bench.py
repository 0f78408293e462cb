"""Speed and memory of our training steps, measured against the computation of the authors' release.

For each stage (further pre-training, self-distillation, fine-tuning) two steps run on the same model,
batch and device, one after the other in the same process:
  ours       the scripts' own step: the stage's optimizer from Run.adamw, then per step the stage's
             training_loss (pretrain / selftrain / finetune) under Run.forward, Run.backward and Run.step, through
             Run.graphed (bf16 autocast and fused AdamW on CUDA, fp32 on CPU; one backward pass; the teacher's
             features computed once before the steps and looked up; --compile or --cuda_graph optional)
  reference  the release's computation (trainer.py of the 2023 code) on the current libraries: fp32 with
             TF32 matmuls and convolutions (torch 1.8's CUDA defaults), eager attention, for-loop AdamW
             (foreach=False), zero_grad without set_to_none, the release's `.item()` per step; for
             self-distillation two backward passes (MAE, then distillation) and the student's unmasked
             feature from a hand-written forward of its own, as the release did
and the table gives images/s (the batch over the median time of the timed steps; with --repeats, the
best of the repeated measurements), peak memory (CUDA: torch.cuda.max_memory_allocated, reset before
each measurement; CPU: n/a, as the process's peak RSS cannot be reset between measurements), the
ratios ours/reference and, on CUDA, the model FLOPs utilisation (MFU) against the GPU's dense bf16
peak. Batches are synthetic uint8 images already on the device (ours normalises them there, as
training.Run does; the reference gets them normalised, as its DataLoader delivered them), so the model
step is measured without the data path.

    python -m lab.bench                       # CUDA: ViT-B/16 at 224, batches 64/64/32; CPU: vit-mae-tiny
    python -m lab.bench --model vit-b16       # on CPU: ViT-B/16 (random weights) at batch 8
    python -m lab.bench --compile             # our model torch.compile'd
    python -m lab.bench --cuda_graph --side_by_side 2.4   # our step in one CUDA graph (experimental)
    python -m lab.bench --data --workers_list 0 1 2 4 8    # the data path only (see below)

`--data` measures the loader alone, in images/s delivered to the device, per worker count: ours
(data.ImageDataset through training.Run.batches with --data_cache off: PIL decode + resize to uint8 in
the workers, normalisation on the device; and, as "once", with --data_cache auto: batches gathered by
index from the split decoded once, the decoding not timed) against the release's per-image path (PIL decode, then
transformers' PIL/NumPy ViT image processor: resize, rescale and normalise to float32 in the
worker, and the release's collate_fn), on an LMDB of generated 500x375 JPEGs written with
data.write_lmdb into a temporary directory.

Model FLOPs (counted analytically, multiply-add = 2 FLOPs). A transformer layer of width d and MLP
width f on T tokens costs, forward,
    2·T·(4d² + 2df)   the q, k, v, output projections and the MLP
  + 4·T²·d            the attention scores QKᵀ and the attention-weighted sum of V.
With N = (image/patch)² patches and K = int(N·(1 − mask_ratio)) kept by the MAE mask:
    unmasked encoder = patch embedding (2·N·3p²·d) + L_enc layers on 1+N tokens
    MAE forward      = patch embedding (all N, embedded before masking) + L_enc layers on 1+K tokens
                       + decoder embedding (2·(1+K)·d·d_dec) + L_dec decoder layers on 1+N tokens
                       + pixel prediction (2·(1+N)·d_dec·3p²)
    further pre-training:  3 × MAE                                  (forward + backward = 3 × forward)
    self-distillation:     3 × (MAE + unmasked encoder) + 1 × unmasked encoder (the frozen teacher)
    fine-tuning:           3 × (unmasked encoder + classifier head 2·d·classes)
For ViT-B/16 at 224 (MAE forward 19.6, unmasked encoder 35.1 GFLOPs) a step costs 58.7, 199.2 and
105.4 GFLOPs per image. MFU = FLOPs per image × images/s / peak; the reference's MFU uses the same
FLOPs and the same bf16 peak, although it computes in fp32/TF32. Our self-distillation step does not
run the teacher (its features are looked up), so our MFU counts 3 × (MAE + unmasked encoder) per image.

With all three stages measured, a projection follows: GPU-hours for the paper's whole table (6 datasets
× [20k steps × 64 further pre-training + 20k × 64 self-distillation + 3 routes × 5 seeds × 10k × 32
fine-tuning]) at the measured img/s, ours (fine-tuning's img/s multiplied by --side_by_side, for runs
sharing the GPU) against the reference (one run at a time), and the MFU over the whole table (the
release's FLOPs: ≈ 5.0 EFLOP for ViT-B/16).
"""
import argparse
import contextlib
import copy
import gc
import io
import os
import platform
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTMAEConfig, ViTMAEForPreTraining, ViTMAEModel

import finetune
import mae_common
import pretrain
import selftrain
import training
import utils
from data import ImageDataset, LMDBReader, write_lmdb
from models import TINY_NAME, MAEWithFeature, Preprocessing, build_classifier, load_mae
from models.checkpoints import IMAGENET_MEAN, IMAGENET_STD

VIT_B16 = "vit-b16"
STAGES = ("further-pretrain", "self-distill", "finetune")
PAPER_BATCH = {"further-pretrain": 64, "self-distill": 64, "finetune": 32}
CPU_VIT_B16_BATCH = 8  # ViT-B/16 steps on a CPU take seconds per image
NUM_CLASSES = 200  # CUB, the largest head of the six datasets
# Dense bf16 peak of the GPUs we run on (TFLOP/s), matched against torch.cuda.get_device_name, first match wins.
BF16_PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("A100", 312.0))
SYNTHETIC_DATASET = "synthetic"
SYNTHETIC_IMAGE_SIZE = (500, 375)  # (width, height): a typical CUB / Stanford Dogs photo


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Images/s and peak memory of our steps vs the release's computation.",
                                allow_abbrev=False)
    g = p.add_argument_group("model steps")
    g.add_argument("--model", default=None, choices=[TINY_NAME, VIT_B16],
                   help=f"{VIT_B16}: ViT-B/16 MAE (the vit-mae-base architecture, random weights); "
                        f"default: {VIT_B16} on CUDA, {TINY_NAME} on CPU")
    g.add_argument("--batch_size", type=utils.int_at_least(1), default=None,
                   help=f"one batch size for every stage; default: the paper's (64, 64, 32), or "
                        f"{CPU_VIT_B16_BATCH} for {VIT_B16} on CPU")
    g.add_argument("--warmup_steps", type=utils.int_at_least(0), default=None,
                   help=f"untimed steps first (default: 5 CUDA, 2 CPU, 1 for {VIT_B16} on CPU)")
    g.add_argument("--steps", type=utils.int_at_least(1), default=None,
                   help=f"timed steps per measurement (default: 20 CUDA, 10 CPU, 3 for {VIT_B16} on CPU)")
    g.add_argument("--repeats", type=utils.int_at_least(1), default=None,
                   help="measure ours and the reference alternately this many times and keep the best of each, "
                        f"for a shared machine (default: 3 for {TINY_NAME} on CPU, else 1)")
    g.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES, help="which stages to measure")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile our model (as the scripts' --compile); the reference is never compiled")
    g.add_argument("--cuda_graph", action=argparse.BooleanOptionalAction, default=False,
                   help="our step with the scripts' --cuda_graph (experimental: whole step in one CUDA graph; on "
                        "CPU the static-buffer step without capture)")
    g.add_argument("--peak_tflops", type=utils.finite_float(0, low_open=True), default=None,
                   help="the GPU's dense bf16 peak for MFU (default: looked up from the device name)")
    g.add_argument("--side_by_side", type=utils.finite_float(0, low_open=True), default=1.0,
                   help="for the projection: the factor by which running fine-tuning runs side by side on one GPU "
                        "multiplies their total img/s (e.g. 2.4, measured for 3 eager runs on an H200); "
                        "1: one at a time")
    g = p.add_argument_group("data path")
    g.add_argument("--data", action="store_true", help="measure the loader only, not the model steps")
    g.add_argument("--workers_list", type=utils.int_at_least(0), nargs="+", default=[0, 1, 2, 4, 8],
                   help="DataLoader worker counts to measure")
    g.add_argument("--data_images", type=utils.int_at_least(1), default=256, help="generated JPEGs in the LMDB")
    g.add_argument("--data_batch_size", type=utils.int_at_least(1), default=64, help="images per batch")
    g.add_argument("--data_batches", type=utils.int_at_least(1), default=20,
                   help="timed batches per measurement (rounded up to whole rounds of the workers)")
    g.add_argument("--image_size", type=utils.int_at_least(1), default=224, help="the size images are resized to")
    p.add_argument("--device", type=utils.device_spec, default="auto",
                   help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=utils.threads_spec, default="auto", help=utils.THREADS_HELP)
    return p


class Setting:
    """What every measurement shares: device, batch size, step counts, a scratch directory."""

    def __init__(self, args, device: torch.device, tmp: str):
        on_cpu = device.type == "cpu"
        self.device, self.tmp, self.compile, self.cuda_graph = device, tmp, args.compile, args.cuda_graph
        self.model = args.model or (TINY_NAME if on_cpu else VIT_B16)
        cpu_b16 = on_cpu and self.model == VIT_B16
        self.batch = {s: args.batch_size or (CPU_VIT_B16_BATCH if cpu_b16 else PAPER_BATCH[s]) for s in STAGES}
        self.warmup = args.warmup_steps if args.warmup_steps is not None else 5 if not on_cpu else 1 if cpu_b16 else 2
        self.steps = args.steps if args.steps is not None else 20 if not on_cpu else 3 if cpu_b16 else 10
        self.repeats = args.repeats if args.repeats is not None else 3 if on_cpu and not cpu_b16 else 1

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- models

def initial_mae(model: str) -> ViTMAEForPreTraining:
    """θ₀ with the recipe's masking settings: vit-mae-tiny exactly as our scripts build it, or the
    ViT-B/16 MAE architecture (ViTMAEConfig() defaults = facebook/vit-mae-base) with random weights."""
    if model == TINY_NAME:
        return load_mae(TINY_NAME)
    mae = ViTMAEForPreTraining(ViTMAEConfig())
    mae.config.mask_ratio, mae.config.norm_pix_loss = 0.75, True  # as load_mae sets them
    return mae


def _assert_attention(model: torch.nn.Module, implementation: str) -> None:
    found = {m.config._attn_implementation for m in model.modules()
             if type(m).__name__.endswith("Attention") and hasattr(m, "config")}
    assert found == {implementation}, f"attention implementations {found}, expected {implementation}"


def eager_config(config: ViTMAEConfig) -> ViTMAEConfig:
    """A copy with eager attention. Set before construction: ViTMAE's decoder deep-copies the config,
    so set_attn_implementation("eager") on a built ViTMAEForPreTraining leaves the decoder on SDPA."""
    config = copy.deepcopy(config)
    config._attn_implementation = "eager"
    return config


def release_mae(theta0: ViTMAEForPreTraining) -> ViTMAEForPreTraining:
    mae = ViTMAEForPreTraining(eager_config(theta0.config))
    mae.load_state_dict(theta0.state_dict())
    _assert_attention(mae, "eager")
    return mae


def frozen_encoder(theta0: ViTMAEForPreTraining, eager: bool = False) -> ViTMAEModel:
    """A teacher: θ₀'s encoder, frozen (its weights do not change the cost)."""
    config = eager_config(theta0.config) if eager else copy.deepcopy(theta0.config)
    encoder = ViTMAEModel(config)
    encoder.load_state_dict(theta0.vit.state_dict())
    return encoder.eval().requires_grad_(False)


def release_cls_feature(encoder: ViTMAEModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """The release's unmasked CLS feature (SelfPreTrainer.get_student_features, also what its ViTModel
    teacher computed): patch + position embeddings, CLS token, every encoder layer, final LayerNorm.
    Equal to models.cls_feature; written out by hand, as the release did. (B, 3, H, W) -> (B, D)."""
    embeddings = encoder.embeddings
    position = embeddings.position_embeddings  # (1, 1+N, D)
    patches = embeddings.patch_embeddings(pixel_values) + position[:, 1:]  # (B, N, D)
    cls = (embeddings.cls_token + position[:, :1]).expand(patches.shape[0], -1, -1)  # (B, 1, D)
    hidden = torch.cat([cls, patches], dim=1)  # (B, 1+N, D)
    for layer in encoder.layers:
        hidden = layer(hidden, None)
    return encoder.layernorm(hidden)[:, 0]


@contextlib.contextmanager
def release_numerics(device: torch.device):
    """fp32 with TF32 matmuls and cuDNN convolutions: torch 1.8's defaults on CUDA (the release had no
    autocast). Restores the previous settings afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def release_adamw(model, no_decay, lr: float, betas) -> torch.optim.AdamW:
    """torch 1.8's AdamW: one parameter at a time (foreach=False), not fused; the same groups and
    hyperparameters as ours (the release's weight decay, 0.01)."""
    groups = training.param_groups(model, 0.01, no_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=False, fused=False)


# ----------------------------------------------------------------------------- timing

def synthetic_batch(s: Setting, stage: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, S, S) uint8 images and (B,) labels on the device, fixed by a seed."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (s.batch[stage], 3, image_size, image_size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (s.batch[stage],), generator=g)
    return images.to(s.device), labels.to(s.device)


def measure(s: Setting, stage: str, step) -> dict:
    """Runs step(i) for the warmup steps, then times s.steps more, one at a time. images/s is the batch
    over the median step time, which a busy machine disturbs less than the mean; the device is
    synchronised after each step, as both loops already do through their per-step `.item()`.
    Peak memory covers all the steps (the optimizer's state appears at the first one)."""
    s.sync()
    if s.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(s.device)
    for i in range(s.warmup):
        step(i)
    seconds = []
    for i in range(s.warmup, s.warmup + s.steps):
        s.sync()
        start = time.perf_counter()
        step(i)
        s.sync()
        seconds.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(s.device) / 2**20 if s.device.type == "cuda" else None
    return {"images_per_s": s.batch[stage] / float(np.median(seconds)), "peak_mib": peak}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def our_run(s: Setting, stage: str, script) -> training.Run:
    """training.Run with the stage script's own defaults (optimizer, clipping, precision), writing nothing
    (Run.without_directory: no lock, record, metrics or state)."""
    argv = ["--dataset", SYNTHETIC_DATASET, "--device", str(s.device), "--batch_size", str(s.batch[stage]),
            "--steps", str(s.warmup + s.steps + 1), "--workers", "0", "--compile" if s.compile else "--no-compile",
            "--cuda_graph" if s.cuda_graph else "--no-cuda_graph"]
    if script is finetune:
        argv += ["--scratch", "True"]
    args = script.get_args_parser().parse_args(argv)
    return training.Run.without_directory(args, f"bench {stage}", Preprocessing())


# ----------------------------------------------------------------------------- further pre-training

def ours_further_pretrain(s: Setting, theta0) -> dict:
    """pretrain.py's step: its optimizer (Run.adamw), then pretrain.training_loss under Run.forward + Run.step."""
    run = our_run(s, "further-pretrain", pretrain)
    mae = copy.deepcopy(theta0)
    num_patches = mae.vit.embeddings.patch_embeddings.num_patches
    model = run.prepare(mae, *run.adamw(mae, mae_common.no_weight_decay, mae_common.MAE_BETAS))
    model.train()
    batch, _ = synthetic_batch(s, "further-pretrain", mae.config.image_size)

    @run.graphed
    def train_step(step, images, noise):
        for micro in run.micro_batches(images, noise):
            with run.forward(step):
                loss, terms = pretrain.training_loss(model, *micro)
            run.backward(loss, terms)
        run.step(step)

    def step(i):
        train_step(i, run.normalize(batch), run.masking_noise(i, num_patches))

    result = measure(s, "further-pretrain", step)
    run.finish()
    return result


def reference_further_pretrain(s: Setting, theta0) -> dict:
    """The release's PreTrainer loop: fp32, model-drawn mask, zero_grad, backward, step, loss.item()."""
    mae = release_mae(theta0).to(s.device).train()
    optimizer = release_adamw(mae, mae_common.no_weight_decay, 1.5e-4, mae_common.MAE_BETAS)
    scheduler = training.linear_schedule(optimizer, 0, 10**9)
    batch, _ = synthetic_batch(s, "further-pretrain", mae.config.image_size)
    images = normalised(batch, s.device)

    def step(_):
        loss = mae(images).loss
        mae.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()
        scheduler.step()
        loss.item()  # the release's progress bar

    with release_numerics(s.device):
        return measure(s, "further-pretrain", step)


def normalised(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What the release's DataLoader delivered: float32 images normalised with the model's statistics."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return (batch.float() / 255 - mean) / std


# ----------------------------------------------------------------------------- self-distillation

def ours_self_distill(s: Setting, theta0) -> dict:
    """selftrain.py's step: the teacher's features computed once before the steps (selftrain.teacher_features,
    untimed) and looked up; one forward of the student gives both terms of selftrain.training_loss, then
    Run.step, one backward pass."""
    run = our_run(s, "self-distill", selftrain)
    student_mae = copy.deepcopy(theta0)
    teacher = frozen_encoder(theta0).to(run.device)
    num_patches = student_mae.vit.embeddings.patch_embeddings.num_patches
    student = run.prepare(MAEWithFeature(student_mae),
                          *run.adamw(student_mae, mae_common.no_weight_decay, mae_common.MAE_BETAS))
    student.train()
    batch, labels = synthetic_batch(s, "self-distill", student_mae.config.image_size)
    images_set = torch.utils.data.TensorDataset(batch.cpu(), labels.cpu())
    teacher_cls = selftrain.teacher_features(teacher, run.device, run, images_set)  # (B, D)
    index = torch.arange(len(batch), device=run.device)

    @run.graphed
    def train_step(step, images, noise, teacher_batch):
        for micro in run.micro_batches(images, noise, teacher_batch):
            with run.forward(step):
                loss, terms = selftrain.training_loss(student, *micro, run.args.distill_weight)
            run.backward(loss, terms)
        run.step(step)

    def step(i):
        train_step(i, run.normalize(batch), run.masking_noise(i, num_patches), teacher_cls[index])

    result = measure(s, "self-distill", step)
    run.finish()
    return result


def reference_self_distill(s: Setting, theta0) -> dict:
    """The release's SelfPreTrainer loop: MAE forward and backward; teacher forward; the student's
    unmasked feature by a second, hand-written forward; distillation backward; one optimizer step."""
    student = release_mae(theta0).to(s.device).train()
    teacher = frozen_encoder(theta0, eager=True).to(s.device)
    optimizer = release_adamw(student, mae_common.no_weight_decay, 1.5e-4, mae_common.MAE_BETAS)
    scheduler = training.linear_schedule(optimizer, 0, 10**9)
    batch, _ = synthetic_batch(s, "self-distill", student.config.image_size)
    images = normalised(batch, s.device)

    def step(_):
        loss = student(images).loss
        student.zero_grad(set_to_none=False)
        loss.backward()
        with torch.no_grad():
            teacher_h = release_cls_feature(teacher, images)
        student_h = release_cls_feature(student.vit, images)
        distill = F.mse_loss(student_h, teacher_h, reduction="sum") / images.shape[0]
        distill.backward()
        optimizer.step()
        scheduler.step()
        loss.item()

    with release_numerics(s.device):
        return measure(s, "self-distill", step)


# ----------------------------------------------------------------------------- fine-tuning

def ours_finetune(s: Setting, theta0) -> dict:
    """finetune.py's step (from θ₀, as --scratch True): its optimizer, the flip drawn for the step, then
    finetune.training_loss under Run.forward + Run.step."""
    run = our_run(s, "finetune", finetune)
    model = build_classifier(theta0.config, theta0.vit.state_dict(), NUM_CLASSES, run.args.dropout)
    classifier = run.prepare(model, *run.adamw(model, finetune.no_weight_decay, finetune.FINETUNE_BETAS))
    classifier.train()
    batch, labels = synthetic_batch(s, "finetune", theta0.config.image_size)

    @run.graphed
    def train_step(step, images, labels, flip):
        for micro in run.micro_batches(images, labels, flip):
            with run.forward(step):
                loss, terms = finetune.training_loss(classifier, *micro)
            run.backward(loss, terms)
        run.step(step)

    def step(i):
        flip = run.global_rand(i, utils.STREAM_FLIP) < 0.5  # (B,)
        train_step(i, run.normalize(batch), labels, flip)

    result = measure(s, "finetune", step)
    run.finish()
    return result


def reference_finetune(s: Setting, theta0) -> dict:
    """The release's FinetuningTrainer loop: per-sample flip on the device (its kornia RandomCrop(224)
    of a 224 image is a no-op and is left out), loss inside the model, accuracy .item(), zero_grad,
    backward, per-parameter gradient clipping, step."""
    model = build_classifier(theta0.config, theta0.vit.state_dict(), NUM_CLASSES, 0.1)
    model.set_attn_implementation("eager")
    _assert_attention(model, "eager")
    model.to(s.device).train()
    optimizer = release_adamw(model, finetune.no_weight_decay, 1e-4, finetune.FINETUNE_BETAS)
    scheduler = training.linear_schedule(optimizer, 500, 10**9)
    batch, labels = synthetic_batch(s, "finetune", theta0.config.image_size)
    images = normalised(batch, s.device)

    def step(_):
        flip = torch.rand(images.shape[0], device=images.device) < 0.5
        x = torch.where(flip[:, None, None, None], images.flip(-1), images)
        out = model(pixel_values=x, labels=labels)
        (out.logits.argmax(dim=1) == labels).float().mean().item()  # the release's accuracy()
        model.zero_grad(set_to_none=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=False)
        optimizer.step()
        scheduler.step()
        out.loss.item()

    with release_numerics(s.device):
        return measure(s, "finetune", step)


MEASURE = {"further-pretrain": (ours_further_pretrain, reference_further_pretrain),
           "self-distill": (ours_self_distill, reference_self_distill),
           "finetune": (ours_finetune, reference_finetune)}


# ----------------------------------------------------------------------------- FLOPs and MFU

def layer_flops(tokens: int, width: int, mlp_width: int) -> int:
    """Forward FLOPs of one transformer layer (see the module docstring)."""
    return 2 * tokens * (4 * width**2 + 2 * width * mlp_width) + 4 * tokens**2 * width


def step_flops_per_image(stage: str, c: ViTMAEConfig, num_classes: int = NUM_CLASSES, teacher: bool = True) -> int:
    """Model FLOPs of one training step, per image (forward + backward = 3 × forward). teacher=False: without
    the frozen teacher's forward, which ours computes once per image before the steps."""
    num_patches = (c.image_size // c.patch_size) ** 2
    kept = int(num_patches * (1 - c.mask_ratio))
    pixels_per_patch = c.num_channels * c.patch_size**2
    patch_embedding = 2 * num_patches * pixels_per_patch * c.hidden_size
    unmasked = patch_embedding + c.num_hidden_layers * layer_flops(1 + num_patches, c.hidden_size,
                                                                    c.intermediate_size)
    mae = (patch_embedding
           + c.num_hidden_layers * layer_flops(1 + kept, c.hidden_size, c.intermediate_size)
           + 2 * (1 + kept) * c.hidden_size * c.decoder_hidden_size
           + c.decoder_num_hidden_layers * layer_flops(1 + num_patches, c.decoder_hidden_size,
                                                       c.decoder_intermediate_size)
           + 2 * (1 + num_patches) * c.decoder_hidden_size * pixels_per_patch)
    if stage == "further-pretrain":
        return 3 * mae
    if stage == "self-distill":
        return 3 * (mae + unmasked) + (unmasked if teacher else 0)
    return 3 * (unmasked + 2 * c.hidden_size * num_classes)


# The paper's whole table: per dataset, stage -> (runs, steps, batch); fine-tuning: 3 routes x 5 seeds
PAPER_DATASETS = 6
PAPER_TABLE = {"further-pretrain": (1, 20000, 64), "self-distill": (1, 20000, 64), "finetune": (3 * 5, 10000, 32)}


def projection(images_per_s: dict[str, float], side_by_side: float = 1.0) -> float:
    """GPU-hours for the paper's whole table at the given per-stage throughputs (img/s); fine-tuning's
    throughput is multiplied by `side_by_side` (several runs sharing one GPU)."""
    seconds = 0.0
    for stage, (runs, steps, batch) in PAPER_TABLE.items():
        rate = images_per_s[stage] * (side_by_side if stage == "finetune" else 1.0)
        seconds += runs * steps * batch / rate
    return PAPER_DATASETS * seconds / 3600


def table_flops(config: ViTMAEConfig) -> float:
    """Model FLOPs of the paper's whole table, the release's computation (the teacher run at every step)."""
    return PAPER_DATASETS * sum(runs * steps * batch * step_flops_per_image(stage, config)
                                for stage, (runs, steps, batch) in PAPER_TABLE.items())


def print_projection(rows: list[dict], config: ViTMAEConfig, side_by_side: float, peak: float | None) -> dict:
    ours = projection({r["stage"]: r["ours_images_per_s"] for r in rows}, side_by_side)
    reference = projection({r["stage"]: r["reference_images_per_s"] for r in rows})
    flops = table_flops(config)
    mfu = lambda hours: f"{flops / (hours * 3600 * peak):.1%}" if peak else "n/a"
    print(f"projection, the paper's table at these rates ({PAPER_DATASETS} datasets x [20k x 64 further "
          f"pre-training + 20k x 64 self-distillation + 3 routes x 5 seeds x 10k x 32 fine-tuning], "
          f"{flops / 1e18:.2f} EFLOP as the release computes it; MFU over the whole table):", flush=True)
    print(f"  ours       {ours:10.4g} GPU-hours  MFU {mfu(ours)}  (fine-tuning side by side: x{side_by_side:g})",
          flush=True)
    print(f"  reference  {reference:10.4g} GPU-hours  MFU {mfu(reference)}  (one run at a time)", flush=True)
    print(f"  reference / ours: {reference / ours:.2f}", flush=True)
    return {"ours_gpu_hours": ours, "reference_gpu_hours": reference, "table_flops": flops}


def bf16_peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in BF16_PEAK_TFLOPS if key in name), None)


# ----------------------------------------------------------------------------- the data path

def write_synthetic_lmdb(data_dir: str, num_images: int, seed: int = 0) -> None:
    """<data_dir>/synthetic/train.lmdb: 500x375 JPEGs (quality 90, ~45 kB) of smooth random colour fields
    with a little grain, like photos in size and decoding cost."""
    rng = np.random.default_rng(seed)
    width, height = SYNTHETIC_IMAGE_SIZE
    grain = [rng.normal(0, 6, (height, width, 3)).astype(np.float32) for _ in range(4)]

    def records():
        for i in range(num_images):
            coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
            buf = io.BytesIO()
            Image.fromarray((smooth + grain[i % 4]).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
            yield buf.getvalue(), i % NUM_CLASSES

    write_lmdb(os.path.join(data_dir, SYNTHETIC_DATASET, "train.lmdb"), records())


class ReleaseDataset(torch.utils.data.Dataset):
    """The release's ImageFolderLMDB with its AutoFeatureExtractor transform: decode, then the ViT image
    processor (PIL resize, rescale and normalise in NumPy float32) per image, in the worker."""

    def __init__(self, lmdb_path: str, image_size: int):
        from transformers import ViTImageProcessorPil  # transformers 5's PIL/NumPy ViTImageProcessor
        self.reader = LMDBReader(lmdb_path)
        self.processor = ViTImageProcessorPil(size={"height": image_size, "width": image_size},
                                              resample=Image.BILINEAR, image_mean=list(IMAGENET_MEAN),
                                              image_std=list(IMAGENET_STD))

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, index):
        image_bytes, label = self.reader[index]
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        return self.processor(image), label


def release_collate(data):
    """The release's collate_fn."""
    x, y = zip(*data)
    x = torch.cat([torch.tensor(np.array(item["pixel_values"])) for item in x])  # (B, 3, S, S) float32
    return x, torch.tensor(y)


def loader_batches(workers: int, timed: int) -> tuple[int, int]:
    """(untimed, timed) batch counts. Each worker builds whole batches, and they start together, so
    batches arrive in rounds of `workers`: the clock starts on the first batch of the second round
    (start-up excluded) and stops on the first batch of a later round (whole rounds timed)."""
    rounds = max(1, workers)
    return workers + 1, -(-timed // rounds) * rounds


def time_loader(batches, batch_size: int, untimed: int, timed: int, device: torch.device) -> float:
    """Images/s of an iterator of device batches, after `untimed` batches."""
    batches = iter(batches)
    for _ in range(untimed):
        next(batches)
    start = time.perf_counter()
    for _ in range(timed):
        images = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del images
    return timed * batch_size / (time.perf_counter() - start)


def ours_loader(args, device: torch.device, data_dir: str, workers: int, data_cache: str = "off") -> float:
    """data.ImageDataset through training.Run.batches, the training scripts' data path: streamed through the
    workers (--data_cache off), or gathered by index from the split decoded once (auto; the decoding,
    or reading the disk copy, happens before the clock starts)."""
    untimed, timed = loader_batches(workers, args.data_batches)
    run_args = pretrain.get_args_parser().parse_args([
        "--dataset", SYNTHETIC_DATASET, "--data_dir", data_dir, "--device", str(device), "--data_cache", data_cache,
        "--workers", str(workers), "--batch_size", str(args.data_batch_size), "--steps", str(untimed + timed)])
    run = training.Run.without_directory(run_args, "bench data", Preprocessing())
    dataset = ImageDataset(SYNTHETIC_DATASET, "train", data_dir, args.image_size)
    batches = (images for _, (images, _, _) in run.batches(dataset))
    return time_loader(batches, args.data_batch_size, untimed, timed, device)


def reference_loader(args, device: torch.device, data_dir: str, workers: int) -> float:
    """The release's get_dataloader: shuffled, pinned, its collate_fn; batches moved to the device."""
    untimed, timed = loader_batches(workers, args.data_batches)
    dataset = ReleaseDataset(os.path.join(data_dir, SYNTHETIC_DATASET, "train.lmdb"), args.image_size)
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True,
                                             num_samples=(untimed + timed) * args.data_batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.data_batch_size, sampler=sampler,
                                         num_workers=workers, collate_fn=release_collate,
                                         pin_memory=device.type == "cuda")
    batches = (x.to(device) for x, _ in loader)
    return time_loader(batches, args.data_batch_size, untimed, timed, device)


def bench_data(args, device: torch.device, tmp: str) -> list[dict]:
    write_synthetic_lmdb(tmp, args.data_images)
    rows = []
    for workers in args.workers_list:
        ours = ours_loader(args, device, tmp, workers)
        decoded = ours_loader(args, device, tmp, workers, data_cache="auto")
        reference = reference_loader(args, device, tmp, workers)
        rows.append({"workers": workers, "ours_images_per_s": ours, "decoded_images_per_s": decoded,
                     "reference_images_per_s": reference, "ratio": ours / reference})
        print_table(rows[-1:], DATA_COLUMNS, header=len(rows) == 1)
    return rows


# ----------------------------------------------------------------------------- the table

# (row key, title, format); the first column is left-aligned, the others right-aligned, all fixed-width
STAGE_COLUMNS = (("stage", "stage", "{}"), ("batch", "batch", "{}"),
                 ("ours_images_per_s", "ours img/s", "{:.4g}"), ("reference_images_per_s", "ref img/s", "{:.4g}"),
                 ("ratio", "ratio", "{:.2f}"),
                 ("ours_peak_mib", "ours MiB", "{:.0f}"), ("reference_peak_mib", "ref MiB", "{:.0f}"),
                 ("memory_ratio", "mem ratio", "{:.2f}"),
                 ("ours_mfu", "ours MFU", "{:.1%}"), ("reference_mfu", "ref MFU", "{:.1%}"),
                 ("gflops_per_image", "GFLOP/img", "{:.2f}"))
DATA_COLUMNS = (("workers", "workers", "{}"), ("ours_images_per_s", "ours img/s", "{:.4g}"),
                ("decoded_images_per_s", "once img/s", "{:.4g}"),
                ("reference_images_per_s", "ref img/s", "{:.4g}"), ("ratio", "ratio", "{:.2f}"))


def print_table(rows: list[dict], columns, header: bool = True) -> None:
    """Rows under a header, in fixed-width columns, so that rows printed one at a time line up."""
    first_width = max(len(stage) for stage in STAGES) if columns is STAGE_COLUMNS else 10

    def line(cells):
        first, *rest = cells
        return "  ".join([f"{first:<{first_width}}"] + [f"{cell:>10}" for cell in rest])
    if header:
        print(line([title for _, title, _ in columns]), flush=True)
    for row in rows:
        print(line(["n/a" if row[key] is None else fmt.format(row[key]) for key, _, fmt in columns]), flush=True)


def describe(device: torch.device) -> str:
    if device.type == "cuda":  # the CPUs matter for --data
        return f"{torch.cuda.get_device_name(device)}, {os.cpu_count()} CPUs"
    model_name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model_name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                          model_name)
    load = os.getloadavg()[0]  # other processes disturb CPU timings: say how busy the machine was
    return f"{model_name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {load:.2f}"


def measure_pair(s: Setting, stage: str, theta0) -> tuple[dict, dict]:
    """Ours, then the reference, alternately s.repeats times; the best images/s of each (the run least
    disturbed by other processes) and the largest peak memory."""
    results = {"ours": [], "reference": []}
    for _ in range(s.repeats):
        for name, measure_fn in zip(results, MEASURE[stage]):
            results[name].append(measure_fn(s, theta0))
            free_memory()
    return tuple({"images_per_s": max(r["images_per_s"] for r in runs),
                  "peak_mib": None if runs[0]["peak_mib"] is None else max(r["peak_mib"] for r in runs)}
                 for runs in results.values())


def bench_stages(args, device: torch.device, tmp: str) -> list[dict]:
    s = Setting(args, device, tmp)
    theta0 = initial_mae(s.model)
    peak = bf16_peak_flops(device, args.peak_tflops)
    print(f"model {s.model}, image {theta0.config.image_size}, ours: "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}{', compiled' if s.compile else ''}; "
          f"{s.warmup} warmup + {s.steps} timed steps, best of {s.repeats}; peak memory: "
          f"{'max_memory_allocated' if device.type == 'cuda' else 'n/a on CPU'}; "
          f"MFU against {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s bf16'}", flush=True)
    rows = []
    for stage in args.stages:
        ours, reference = measure_pair(s, stage, theta0)
        flops = step_flops_per_image(stage, theta0.config)
        ours_flops = step_flops_per_image(stage, theta0.config, teacher=False)  # what our step computes
        row = {"stage": stage, "batch": s.batch[stage],
               "ours_images_per_s": ours["images_per_s"], "reference_images_per_s": reference["images_per_s"],
               "ratio": ours["images_per_s"] / reference["images_per_s"],
               "ours_peak_mib": ours["peak_mib"], "reference_peak_mib": reference["peak_mib"],
               "memory_ratio": (ours["peak_mib"] / reference["peak_mib"]) if ours["peak_mib"] else None,
               "ours_mfu": ours_flops * ours["images_per_s"] / peak if peak else None,
               "reference_mfu": flops * reference["images_per_s"] / peak if peak else None,
               "gflops_per_image": flops / 1e9}
        rows.append(row)
        print_table([row], STAGE_COLUMNS, header=len(rows) == 1)
    if {row["stage"] for row in rows} == set(STAGES):
        print_projection(rows, theta0.config, args.side_by_side, peak)
    return rows


def main(args) -> list[dict]:
    device = training.resolve_device(args.device, 0)
    if utils.cpu_threads(args.threads, device.type) is not None:
        torch.set_num_threads(utils.cpu_threads(args.threads, device.type))
    print(f"device: {describe(device)}; torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        rows = bench_data(args, device, tmp) if args.data else bench_stages(args, device, tmp)
    return rows


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
