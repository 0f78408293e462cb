"""Peak memory and speed of a training step with and without --accum_steps and --grad_checkpointing, side by side.

Each configuration runs in a fresh process (a process's peak RSS cannot be reset), one after the other on the same
model, batch and device: the stage's own step (training_loss under Run.micro_batches / forward / backward / step,
through Run.without_directory) for --warmup_steps untimed steps and --steps timed ones. Peak memory: on CUDA
torch.cuda.max_memory_allocated over the steps; on CPU the process's peak RSS (getrusage) minus its RSS just
before the first step, i.e. what the steps added: gradients, AdamW's state, activations. Speed: the batch over
the median step time.

    python -m lab.bench_accumulation                          # a ViT-Ti/16 MAE at 224 (random weights), batch 8
    python -m lab.bench_accumulation --model vit-b16 --batch_size 64   # CUDA: ViT-B/16 MAE, the paper's batch

On a GPU, make gpu-check runs the latter as its part bench-accumulation (lab/gpu_check.py).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from transformers import ViTMAEConfig, ViTMAEForPreTraining

import finetune
import pretrain
import training
import utils
from models import Preprocessing, build_classifier
from models.vit_mae import freeze_sincos_tables, mae_initialize

# 12 layers on 196 patches at 224 (random weights), small enough for a CPU, large enough for the activations to
# weigh in the step's memory
MODELS = {"vit-ti16": dict(hidden_size=192, num_hidden_layers=12, num_attention_heads=3, intermediate_size=768,
                           decoder_hidden_size=128, decoder_num_hidden_layers=2, decoder_num_attention_heads=4,
                           decoder_intermediate_size=512),
          "vit-s16": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                          decoder_hidden_size=256, decoder_num_hidden_layers=4, decoder_num_attention_heads=8,
                          decoder_intermediate_size=1024),
          "vit-b16": {}}  # ViTMAEConfig's defaults: facebook/vit-mae-base
CONFIGS = [(1, False), (4, False), (1, True), (4, True)]  # (accum_steps, grad_checkpointing)
STAGES = {"further-pretrain": pretrain, "finetune": finetune}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="vit-ti16", choices=list(MODELS), help="the MAE architecture (random weights)")
    p.add_argument("--batch_size", type=utils.int_at_least(1), default=8, help="the optimizer step's batch")
    p.add_argument("--warmup_steps", type=utils.int_at_least(0), default=1, help="untimed steps first")
    p.add_argument("--steps", type=utils.int_at_least(1), default=3, help="timed steps")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--image_size", type=utils.int_at_least(16), default=224,
                   help="the images' side (a multiple of the 16-pixel patch); smaller only to exercise the code")
    p.add_argument("--device", type=utils.device_spec, default="auto")
    p.add_argument("--threads", type=utils.threads_spec, default="auto", help=utils.THREADS_HELP)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: 'stage,K,checkpointing' in this process
    return p


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_one(args, stage: str, accum_steps: int, checkpointing: bool) -> dict:
    """One configuration, in this process: {images_per_s, peak_mib}."""
    script = STAGES[stage]
    argv = ["--dataset", "synthetic", "--device", args.device, "--threads", str(args.threads), "--batch_size",
            str(args.batch_size), "--steps", str(args.warmup_steps + args.steps), "--accum_steps", str(accum_steps),
            "--grad_checkpointing" if checkpointing else "--no-grad_checkpointing", "--workers", "0"]
    run_args = script.get_args_parser().parse_args(argv + (["--scratch", "True"] if script is finetune else []))
    run = training.Run.without_directory(run_args, f"bench {stage}", Preprocessing())
    torch.manual_seed(0)
    mae = ViTMAEForPreTraining(ViTMAEConfig(**MODELS[args.model], image_size=args.image_size))
    mae_initialize(mae)
    freeze_sincos_tables(mae)
    g = torch.Generator().manual_seed(0)
    size = mae.config.image_size
    images = torch.randn(args.batch_size, 3, size, size, generator=g).to(run.device)
    labels = torch.randint(0, 10, (args.batch_size,), generator=g).to(run.device)
    if script is pretrain:
        model = run.prepare(mae, *run.adamw(mae, lambda n, p: p.ndim <= 1, (0.9, 0.95)))
        num_patches = mae.vit.embeddings.patch_embeddings.num_patches

        def inputs(step):
            return images, run.masking_noise(step, num_patches)
    else:
        classifier = build_classifier(mae.config, mae.vit.state_dict(), 10, run_args.dropout)
        model = run.prepare(classifier, *run.adamw(classifier, finetune.no_weight_decay, finetune.FINETUNE_BETAS))

        def inputs(step):
            return images, labels, run.global_rand(step, utils.STREAM_FLIP) < 0.5
    model.train()

    def train_step(step, *batch):
        for micro in run.micro_batches(*batch):
            with run.forward(step):
                loss, terms = script.training_loss(model, *micro)
            run.backward(loss, terms)
        run.step(step)

    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(run.device)
        torch.cuda.reset_peak_memory_stats(run.device)
    before = _rss_bytes()
    seconds = []
    for step in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        train_step(step, *inputs(step))
        if cuda:
            torch.cuda.synchronize(run.device)
        if step >= args.warmup_steps:
            seconds.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated(run.device) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
    return {"images_per_s": args.batch_size / float(np.median(seconds)), "peak_mib": peak / 2**20,
            "device": run.process.device_name()}


def ratios(rows: list[dict]) -> list[tuple[dict, float | None, float | None]]:
    """lab.bench_accumulation's rows, each with its img/s and peak memory over those of its stage's --accum_steps 1
    without checkpointing (None where that row is missing or its memory is 0)."""
    base = {r["stage"]: r for r in rows if r["accum_steps"] == 1 and not r["grad_checkpointing"]}
    out = []
    for r in rows:
        b = base.get(r["stage"])
        out.append((r, r["images_per_s"] / b["images_per_s"] if b else None,
                    r["peak_mib"] / b["peak_mib"] if b and b["peak_mib"] > 0 else None))
    return out


def main(args) -> list[dict]:
    if args.image_size % 16:
        raise utils.UserError(f"--image_size {args.image_size} is not a multiple of the 16-pixel patch")
    if args.one is not None:
        stage, k, checkpointing = args.one.split(",")
        print(json.dumps(measure_one(args, stage, int(k), checkpointing == "1")))
        return []
    rows = []
    print(f"{'stage':<18}{'accum_steps':>12}{'checkpointing':>15}{'images/s':>10}{'peak MiB':>10}")
    for stage in args.stages:
        for k, checkpointing in CONFIGS:
            if args.batch_size % k:
                continue
            cmd = [sys.executable, "-m", "lab.bench_accumulation", "--model", args.model, "--batch_size",
                   str(args.batch_size), "--warmup_steps", str(args.warmup_steps), "--steps", str(args.steps),
                   "--device", args.device, "--threads", str(args.threads), "--image_size", str(args.image_size),
                   "--one", f"{stage},{k},{int(checkpointing)}"]
            # the repository on the child's path, wherever this runs from (make gpu-check's part, say)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode:
                last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
                raise RuntimeError(f"{stage} with --accum_steps {k}, checkpointing {'on' if checkpointing else 'off'}:"
                                   f" {last}")
            out = proc.stdout
            row = {"stage": stage, "accum_steps": k, "grad_checkpointing": checkpointing,
                   **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(f"{stage:<18}{k:>12}{'on' if checkpointing else 'off':>15}{row['images_per_s']:>10.2f}"
                  f"{row['peak_mib']:>10.0f}", flush=True)
    if rows:
        print(f"model {args.model} at {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps after "
              f"{args.warmup_steps}, on {rows[0]['device']}")
    return rows


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
