"""--accum_steps K: K micro-batches of B/K per optimizer step, with the batch's own draws, take the steps of the
whole batch within float rounding -- in each stage, and under DDP without an all-reduce on the inner micro-batches.
--grad_checkpointing: the same gradients (dropout's masks drawn again in the recomputation), less memory."""
import contextlib
import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import finetune
import pretrain
import selftrain
import training
from helpers import REPO, TINY, report_line
from helpers import Cut, assert_one_line, cut_at, spy_prepare
from models import build_classifier, load_mae
from models.vit_mae import checkpoint_activations

STAGES = {"pretrain": pretrain, "selftrain": selftrain, "finetune": finetune}
# The attention key bias cancels in softmax: its true gradient is 0, and AdamW turns the rounding noise left in it
# into ±lr steps whose sign the summation order decides. Every other element is held to PARAM_ATOL.
ZERO_GRADIENT = "k_proj.bias"
# Measured over the three stages, K = 2 and 4, 3 steps of batch 8 (vit-mae-tiny, fp32 CPU): the largest difference
# from K = 1 is 3.0e-7 (an AdamW step moves a weight by about lr = 1e-4 .. 1.5e-4). 2e-6 is 1-2 % of one step:
# a micro-batch with other draws moves weights by 1e-5 and more (test_other_draws_in_one_micro_batch_are_caught).
PARAM_ATOL = 2e-6
# The logged batch loss and gradient norm (before clipping): AdamW hardly sees a gradient scaled by a constant
# (and clipping undoes it), so the norm is what shows each micro-batch's loss scaled by 1/K. Measured: they agree to
# 2e-7 relative.
LOSS_RTOL = 1e-5


def _train(stage, stage_args, tmp_path, monkeypatch, name, *extra, steps=3):
    """The stage's main() on the tiny model; -> (the trained parameters, the logged (loss, grad_norm) per step)."""
    seen = spy_prepare(monkeypatch)
    argv = stage_args("--output_dir", tmp_path / name, "--seed", 1, *extra, steps=steps)
    if stage == "finetune":
        argv += ["--scratch", "True", "--results_dir", str(tmp_path / "results")]
    STAGES[stage].main(STAGES[stage].get_args_parser().parse_args(argv))
    monkeypatch.undo()
    with open(tmp_path / name / training.METRICS_FILE) as f:
        losses = [(line["loss"], line["grad_norm"]) for line in map(json.loads, f)]
    return {k: v.detach().clone() for k, v in seen["model"].named_parameters() if v.requires_grad}, losses


def _largest_difference(one: dict, other: dict) -> float:
    return max((one[k] - other[k]).abs().max().item() for k in one if not k.endswith(ZERO_GRADIENT))


@pytest.fixture
def teacher(stage_args, tmp_path, monkeypatch):
    """selftrain's default teacher, written by pretrain under the fixture's checkpoint directory."""
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=3)))


@pytest.mark.parametrize("stage", list(STAGES))
def test_accumulated_steps_equal_the_whole_batch(stage, stage_args, tmp_path, monkeypatch, request):
    """K = 1, 2, 4 micro-batches of a batch of 8 give the same parameters after 3 steps and log the same losses
    and gradient norms.
    Fine-tuning runs with its dropout 0.1: each micro-batch must see its rows of the global batch's masks."""
    if stage == "selftrain":
        request.getfixturevalue("teacher")
    whole, whole_losses = _train(stage, stage_args, tmp_path, monkeypatch, "k1", "--warmup_steps", 1)
    for k in (2, 4):
        accumulated, losses = _train(stage, stage_args, tmp_path, monkeypatch, f"k{k}", "--warmup_steps", 1,
                                     "--accum_steps", k)
        largest = _largest_difference(whole, accumulated)
        report_line(f"accumulation {stage} K={k}: largest parameter difference from K=1 {largest:.2g} "
                    f"(bound {PARAM_ATOL:g})")
        assert largest <= PARAM_ATOL, f"{stage}, K={k}: a parameter departs by {largest:.3g}"
        worst = max(abs(a / b - 1) for one, other in zip(losses, whole_losses) for a, b in zip(one, other))
        report_line(f"accumulation {stage} K={k}: logged loss and gradient norm within {worst:.2g} relative")
        assert [x for line in losses for x in line] == pytest.approx([x for line in whole_losses for x in line],
                                                                    rel=LOSS_RTOL)


@pytest.mark.parametrize("broken", ["masking noise", "dropout masks"])
def test_other_draws_in_one_micro_batch_are_caught(broken, stage_args, tmp_path, monkeypatch):
    """The comparison above is sharp enough to see one micro-batch of four taking other draws: the second
    micro-batch's masking noise reversed (further pre-training), or its dropout masks taken from the first
    micro-batch's rows (fine-tuning)."""
    stage = "pretrain" if broken == "masking noise" else "finetune"
    whole, _ = _train(stage, stage_args, tmp_path, monkeypatch, "k1", "--warmup_steps", 1)
    real_micro_batches, real_forward = training.Run.micro_batches, training.Run.forward

    def micro_batches(self, *batch):
        for micro, inputs in enumerate(real_micro_batches(self, *batch)):
            if micro == 1 and broken == "masking noise":
                inputs = (inputs[0], inputs[1].flip(-1))
            yield inputs

    @contextlib.contextmanager
    def forward(self, step):
        with real_forward(self, step):
            if broken == "dropout masks":
                for dropout in self._dropouts:
                    dropout.micro = 0
            yield

    monkeypatch.setattr(training.Run, "micro_batches", micro_batches)
    monkeypatch.setattr(training.Run, "forward", forward)
    seen = spy_prepare(monkeypatch)
    argv = stage_args("--output_dir", tmp_path / "k4", "--seed", 1, "--warmup_steps", 1, "--accum_steps", 4, steps=3)
    if stage == "finetune":
        argv += ["--scratch", "True", "--results_dir", str(tmp_path / "results")]
    STAGES[stage].main(STAGES[stage].get_args_parser().parse_args(argv))
    broken_params = {k: v.detach() for k, v in seen["model"].named_parameters() if v.requires_grad}
    assert _largest_difference(whole, broken_params) > 5 * PARAM_ATOL


def _torchrun(nproc, argv, cwd, script):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", script,
           *map(str, argv)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


# One process of a job: fine-tuning's step (dropout 0.1) on a tiny classifier under Run.without_directory, the
# all-reduces DDP makes counted by a communication hook; prints the count and the trained weights' path.
_DDP_STEPS = textwrap.dedent("""
    import sys
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    import finetune, training
    from models import Preprocessing, build_classifier, load_mae

    accum_steps, out = sys.argv[1], sys.argv[2]
    args = finetune.get_args_parser().parse_args(["--dataset", "digits", "--device", "cpu", "--batch_size", "8",
                                                  "--steps", "3", "--scratch", "True", "--accum_steps", accum_steps])
    run = training.Run.without_directory(args, "ddp", Preprocessing())
    theta0 = load_mae("vit-mae-tiny")
    model = build_classifier(theta0.config, theta0.vit.state_dict(), 10, args.dropout)
    classifier = run.prepare(model, *run.adamw(model, finetune.no_weight_decay, finetune.FINETUNE_BETAS))
    classifier.train()
    reduces = []

    def hook(state, bucket):
        reduces.append(bucket.index())
        return allreduce_hook(None, bucket)

    if isinstance(classifier, torch.nn.parallel.DistributedDataParallel):
        classifier.register_comm_hook(None, hook)
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    local = 8 // run.process.world
    rows = slice(run.process.rank * local, (run.process.rank + 1) * local)
    for step in range(3):
        flip = run.global_rand(step, 2) < 0.5
        for micro in run.micro_batches(images[rows], labels[rows], flip):
            with run.forward(step):
                loss, terms = finetune.training_loss(classifier, *micro)
            run.backward(loss, terms)
        run.step(step)
    if run.is_main:
        torch.save(model.state_dict(), out)
        print("all-reduces", len(reduces))
""")


def test_two_processes_accumulate_like_one_without_inner_all_reduce(tmp_path):
    """Fine-tuning's step (dropout 0.1) in a DDP job of 2 processes with K = 2 takes the steps of one process
    with the whole batch, and all-reduces the gradients as often as the job with K = 1: never on the inner
    micro-batches (no_sync)."""
    script = tmp_path / "ddp_steps.py"
    script.write_text(_DDP_STEPS)
    one = _torchrun(1, [1, tmp_path / "one.pt"], tmp_path, script)
    counts = {}
    for k in (1, 2):
        out = _torchrun(2, [k, tmp_path / f"two{k}.pt"], tmp_path, script)
        counts[k] = int(out.split("all-reduces")[1].split()[0])
    assert "all-reduces 0" in one  # one process: no DDP
    assert counts[1] > 0 and counts[2] == counts[1], counts
    whole = torch.load(tmp_path / "one.pt")
    for k in (1, 2):
        two = torch.load(tmp_path / f"two{k}.pt")
        assert _largest_difference(whole, two) <= PARAM_ATOL, k


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("extra, words", [
    (("--batch_size", 6, "--accum_steps", 4), ("--batch_size 6", "--accum_steps 4", "multiple of 4")),
    (("--accum_steps", 2, "--cuda_graph"), ("--cuda_graph", "--accum_steps")),
    (("--grad_checkpointing", "--cuda_graph"), ("--cuda_graph", "--grad_checkpointing")),
])
def test_refused_combinations_say_why_in_one_line(extra, words, data_dir, tmp_path):
    argv = [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--steps", 2, "--batch_size", 8,
            "--output_dir", tmp_path / "run", *extra]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain.py"), *map(str, argv)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_one_line(proc.stderr, *words)
    assert not os.path.exists(tmp_path / "run" / training.RECORD_FILE)  # refused before anything was written


# ----------------------------------------------------------------------------- gradient checkpointing

def _gradients(model, checkpointing: bool) -> tuple[dict, int]:
    """One forward and backward of the classifier in training mode with dropout seeded as a step seeds it;
    -> (the gradients, how many times the first encoder layer's MLP ran)."""
    model = copy.deepcopy(model).train()
    training.draws.use_global_batch_dropout(model, rank=0, world=1)
    if checkpointing:
        checkpoint_activations(model)
    calls = []
    model.vit.layers[0].mlp.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)
    torch.manual_seed(123)
    torch.nn.functional.cross_entropy(model(images).logits, labels).backward()
    return {k: p.grad for k, p in model.named_parameters() if p.grad is not None}, len(calls)


def test_gradient_checkpointing_gives_the_same_gradients():
    """With dropout 0.3 on the hidden states: the recomputation in the backward pass draws the forward's masks
    again, so the gradients are the same; and the layers do run twice (they are recomputed)."""
    theta0 = load_mae("vit-mae-tiny")
    model = build_classifier(theta0.config, theta0.vit.state_dict(), 10, dropout=0.3)
    kept, once = _gradients(model, checkpointing=False)
    recomputed, twice = _gradients(model, checkpointing=True)
    assert (once, twice) == (1, 2)
    assert kept.keys() == recomputed.keys()
    for k in kept:
        torch.testing.assert_close(recomputed[k], kept[k], rtol=0, atol=0, msg=k)


def test_gradient_checkpointing_run_takes_the_same_steps(stage_args, tmp_path, monkeypatch):
    """Further pre-training with --grad_checkpointing (and with --accum_steps 2 too): the same parameters."""
    kept, _ = _train("pretrain", stage_args, tmp_path, monkeypatch, "kept")
    recomputed, _ = _train("pretrain", stage_args, tmp_path, monkeypatch, "recomputed", "--grad_checkpointing")
    both, _ = _train("pretrain", stage_args, tmp_path, monkeypatch, "both", "--grad_checkpointing",
                     "--accum_steps", 2)
    assert _largest_difference(kept, recomputed) == 0
    assert _largest_difference(kept, both) <= PARAM_ATOL


def test_a_run_resumes_with_another_accum_steps(stage_args, tmp_path, monkeypatch):
    """--accum_steps changes the memory, not the steps (utils.RESULT_NEUTRAL_FLAGS): a run killed after step 2 of 4
    with K = 1 continues with K = 2, each start recorded with its own K, and ends where an unbroken run ends."""
    whole, _ = _train("pretrain", stage_args, tmp_path, monkeypatch, "whole", steps=4)
    argv = stage_args("--output_dir", tmp_path / "resumed", "--seed", 1, "--save_every", 2, steps=4)
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    resumed, _ = _train("pretrain", stage_args, tmp_path, monkeypatch, "resumed", "--save_every", 2,
                        "--accum_steps", 2, steps=4)
    with open(tmp_path / "resumed" / training.RECORD_FILE) as f:
        history = json.load(f)["history"]
    assert [(entry["start_step"], entry["args"]["accum_steps"]) for entry in history] == [(0, 1), (2, 2)]
    assert _largest_difference(whole, resumed) <= PARAM_ATOL
