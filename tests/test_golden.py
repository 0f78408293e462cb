"""Our three stages, run through their own main(), against the authors' release itself.

tests/golden/ holds numbers that the release's unmodified code computed on transformers 4.17 for a tiny
ViT-MAE (tests/golden/README.md says exactly how): θ₀ and a teacher in the release's 4.x names, 8 images,
masking noise, labels and flips; the losses of each step, all parameters after 2 further pre-training
steps, 2 self-distillation steps and 3 fine-tuning steps, the learning rates, the optimizer groups, and
the evaluation.

Each test calls the stage's own `main(args)` (pretrain.main, selftrain.main, finetune.main) on the fixture:
θ₀ as a model directory with the release's 4.17 names, the 8 images as the dataset `golden` (both splits:
the release's test() scored the same images), the teacher as the release's `model.pt`, where selftrain.main
looks for it by default. Handed in from outside are only what the release drew at random:
- the per-step draws, through the run's one seam for them (training.supplied_draws, ReleaseDraws below): the
  release's masking noise and flips of each step, and its data order. The release's order was the identity
  (S5); we replay the 8 images permuted, the noise and flips following their image, so that an image paired
  with another row's noise, flip, label or teacher feature fails. The release cut its 20,000-step runs after
  2 steps (S7); ReleaseDraws stops main() the same way, before step 3;
- the new classifier head, which the release drew after torch.manual_seed(1): finetune.build_classifier is
  wrapped to copy it in after building the model as main() asked.
Everything else -- which weights are loaded where, the optimizer and its groups, the schedule, clipping, the
teacher's features and their lookup, the flip rule, the split evaluated, the defaults -- is the script's own,
and is observed, not re-typed: metrics.jsonl (losses, learning rates, gradient norms), train_state.pt saved
after every step (--save_every 1), the saved classifier (--save_model), the result file, and, through wrappers
that call the real functions, the model and optimizer handed to Run.prepare and the inputs of each step's
training_loss.

Tolerances (measured agreement in the comments by each): losses to LOSS_RTOL; parameters to PARAM_ATOL after
further pre-training, plus a relative part for self-distillation; the fine-tuning UPDATE θ₃ − θ_init to
1e-8 + 1e-3 relative. Elements whose gradient is at rounding level may move by a whole AdamW step in either
direction (RoundingLevel below); at most ROUNDING_MAX_ELEMENTS of them may use that allowance, and the
count is reported at the end of the test session.
"""
import argparse
import functools
import io
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
import pretrain
import selftrain
import training
import utils
from data import write_lmdb
from models import cls_feature, load_mae
from transformers import ViTForImageClassification

from helpers import Cut, GOLDEN, WatchedSteps, cut_at, report_line, spy, spy_prepare, v4_name


LOSS_RTOL = 1e-5  # measured: the losses agree to 3e-7 relative
# Parameters after each MAE step, every element: |ours − release| <= PARAM_ATOL. An AdamW step moves a weight by
# about lr = 1.5e-4, so 1e-6 is 0.7 % of one step (a missing step, a wrong lr or beta fails). Measured: the
# largest difference of an element not at rounding level (below) is 4.5e-7.
PARAM_ATOL = 1e-6
# AdamW's first steps move a weight by about lr·g/(|g| + eps), eps = 1e-8. Where a gradient element is itself at
# rounding level, that ratio -- and so the step -- is decided by rounding, in the release as in ours, and may
# differ by up to a whole step either way (2·Σlr). An element may use that allowance only if its gradient was
# below ROUNDING_GRAD = 10·eps at some step (measured: every element beyond PARAM_ATOL was), and only
#  - in the attention key biases, whose true gradient is exactly 0 (softmax ignores a shift shared by all keys,
#    so their gradient is pure rounding): measured, self-distillation needs it for ~240 of their 256 elements;
#  - or for at most ROUNDING_MAX_ELEMENTS other elements: measured 6 (all with |g| < 1.4e-8).
# The counts are reported at the end of the test session.
ROUNDING_GRAD = 1e-7
ZERO_GRADIENT = re.compile(r"\.attention\.attention\.key\.bias$")
ROUNDING_MAX_ELEMENTS = 16
ORDER = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])  # our data order of the 8 images (the release's: 0..7)


# ----------------------------------------------------------------------------- names

def v4_state(state: dict) -> dict:
    return {v4_name(n): t.detach().clone() for n, t in state.items()}


# ----------------------------------------------------------------------------- the fixture as the scripts' inputs

class ReleaseDraws(WatchedSteps):
    """The release's per-step randomness in our data order, for training.supplied_draws: row j of every batch is
    image ORDER[j], its masking noise is the release's noise of that image at that step, its flip the
    release's flip of it. `on_step(step)` is called as each step starts; asking for step `stop` raises Cut
    (the release's runs were cut after 2 complete steps, S7)."""

    def __init__(self, batch: dict, stop: int | None = None, on_step=None):
        super().__init__(stop, on_step)
        self.batch = batch

    def indices(self, n: int, step: int) -> torch.Tensor:
        assert n == len(ORDER), f"the stage trains on {n} images, the fixture has {len(ORDER)}"
        self.starting(step)
        return ORDER.clone()

    def uniform(self, step: int, stream: int, *shape: int) -> torch.Tensor:
        if stream == utils.STREAM_NOISE:
            noise = self.batch["noise"][step]  # (8, N), row i: image i
            assert shape == noise.shape[1:], f"masking noise asked for {shape} patches, the fixture has {noise.shape[1:]}"
            return noise[ORDER]
        if stream == utils.STREAM_FLIP:
            assert shape == (), f"flips asked with shape {shape}"
            # a uniform draw u with u < 0.5 exactly where the release flipped: a script's own rule decides
            return torch.where(self.batch["flips"][step][ORDER], 0.25, 0.75)
        raise AssertionError(f"the stage drew from stream {stream}, which the release had no counterpart of")

    def dropout_seed(self, step: int) -> int:
        return step


def run_main(module, argv: list, draws: ReleaseDraws):
    """module.main(args) as the command line would call it, with the release's draws; returns args."""
    args = module.get_args_parser().parse_args([str(a) for a in argv])
    with training.supplied_draws(lambda *_: draws):
        module.main(args)
    return args


@pytest.fixture(scope="module")
def golden_data(golden, tmp_path_factory) -> str:
    """--data_dir holding the dataset `golden`: the fixture's 8 images (PNG, lossless) with their labels, in
    the release's LMDB layout, as train and test split (the release's test() scored the same 8 images)."""
    expected, batch, _ = golden
    root = tmp_path_factory.mktemp("golden-data")
    records = []
    for image, label in zip(batch["images_uint8"], batch["labels"].tolist()):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, format="PNG")
        records.append((buffer.getvalue(), label))
    for split in ("train", "test"):
        write_lmdb(str(root / "golden" / f"{split}.lmdb"), records)
    with open(root / "golden" / "counts.json", "w") as f:
        json.dump({"num_classes": expected["finetune"]["num_classes"]}, f)
    return str(root)


def stage_argv(theta0_dir, data_dir, out_dir, *flags):
    """The fixture's setting on the command line: CPU (fp32), batch 8, a metrics line every step. Nothing
    else: every recipe value (steps, lr, schedule, betas, weight decay, mask ratio, λ, clipping) is the
    script's default."""
    return ["--dataset", "golden", "--data_dir", data_dir, "--model_name", theta0_dir, "--device", "cpu",
            "--batch_size", 8, "--workers", 0, "--log_every", 1, "--output_dir", out_dir, *flags]


def metrics(out_dir, key: str) -> list[float]:
    with open(os.path.join(out_dir, training.METRICS_FILE)) as f:
        return [json.loads(line)[key] for line in f]


def saved_state(out_dir) -> dict:
    return torch.load(os.path.join(out_dir, training.STATE_FILE), weights_only=True)


# ----------------------------------------------------------------------------- comparisons

def assert_losses(ours, release, what):
    assert len(ours) == len(release), f"{what}: {len(ours)} steps logged, the release ran {len(release)}"
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(release, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0, msg=lambda m: f"{what} departs from the release's: {m}")


class RoundingLevel:
    """Records, through parameter hooks, which elements ever had a gradient below ROUNDING_GRAD in magnitude."""

    def __init__(self, model: torch.nn.Module):
        self.mask = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.mask[v4_name(name)] = torch.zeros_like(param, dtype=torch.bool)
                param.register_hook(functools.partial(self._record, v4_name(name)))

    def _record(self, name: str, grad: torch.Tensor) -> None:  # returns None: the gradient is unchanged
        self.mask[name].logical_or_(grad.abs() < ROUNDING_GRAD)


def assert_params(ours: dict, release: dict, prefix: str, what: str, rounding: RoundingLevel, lr_sum: float,
                  atol=PARAM_ATOL) -> None:
    """Every trainable tensor, every element within atol of the release's; an element at rounding level
    (RoundingLevel) beyond it may be within 2·lr_sum (a whole AdamW step each way) if it is an attention key
    bias (ZERO_GRADIENT) or one of at most ROUNDING_MAX_ELEMENTS others. Reports the largest difference within
    atol and how many elements used the allowance."""
    names = sorted(k[len(prefix):] for k in release if k.startswith(prefix))
    assert sorted(ours) == names, (f"{what}: the trained parameters are not the release's: only ours "
                                   f"{sorted(set(ours) - set(names))[:4]}, only the release's {sorted(set(names) - set(ours))[:4]}")
    zero_gradient, others, largest = 0, [], 0.0
    for name in names:
        diff = (ours[name] - release[prefix + name]).abs()
        over = diff > atol
        allowed = over & rounding.mask[name] & (diff <= 2 * lr_sum)
        largest = max(largest, diff[~over].max().item() if (~over).any() else 0.0)
        assert not (over & ~allowed).any(), (
            f"{what}: {name}: {int((over & ~allowed).sum())} element(s) depart from the release's by more than "
            f"{atol:g} (largest {diff[over & ~allowed].max().item():.3g}; an AdamW step here is about {lr_sum:.2g})")
        if ZERO_GRADIENT.search(name):
            zero_gradient += int(allowed.sum())
        else:
            others += [f"{name}{[int(j) for j in np.unravel_index(i, diff.shape)]}" for i in allowed.flatten().nonzero().flatten().tolist()]
    assert len(others) <= ROUNDING_MAX_ELEMENTS, (
        f"{what}: {len(others)} elements beyond {atol:g} at rounding level, more than the {ROUNDING_MAX_ELEMENTS} "
        f"allowed: {others[:8]}")
    report_line(f"golden {what}: largest difference within the bound {largest:.2g} (bound {atol:g}); rounding "
                f"allowance used by {zero_gradient} key-bias element(s) and {len(others)} other(s)"
                f"{': ' + ', '.join(others[:6]) if others else ''}")


def assert_optimizer(seen: dict, stage: dict, lrs: list[list[float]], what: str) -> None:
    """Every optimizer group main() built: its parameters (by name), betas, eps, weight decay, amsgrad, and the
    learning rate it used at each step (lrs[k]: every group's at step k+1), against the release's."""
    names = {id(p): v4_name(n) for n, p in seen["model"].named_parameters()}
    ours = {g["weight_decay"]: g for g in seen["optimizer"].param_groups}
    release = {g["weight_decay"]: g for g in stage["param_groups"]}
    assert sorted(ours) == sorted(release), f"{what}: weight decays {sorted(ours)}, the release's {sorted(release)}"
    for wd, group in release.items():
        got = ours[wd]
        assert sorted(names[id(p)] for p in got["params"]) == sorted(group["params"]), \
            f"{what}: the parameters with weight decay {wd} are not the release's"
        for key in ("betas", "eps", "amsgrad"):
            value = list(got[key]) if key == "betas" else got[key]
            assert value == group[key], f"{what}: group wd={wd}: {key} {value}, the release's {group[key]}"
    lrs = lrs[:len(stage["lr"])]  # a cut run also saw the start of the step it was cut at
    wanted = [lr for lr in stage["lr"] for _ in release]
    assert [lr for step in lrs for lr in step] == pytest.approx(wanted, rel=1e-12, abs=1e-20), \
        f"{what}: learning rates per step and group {lrs}, the release's {stage['lr']}"


def observe_steps(seen: dict, lrs: list, out=None, states=None):
    """on_step for ReleaseDraws, as each step starts: at the first, hooks on the model main() trains
    (RoundingLevel); every step, the learning rate of every group (what the step uses); with `states`, the
    parameters after the steps so far, from train_state.pt (saved after every step: --save_every 1)."""
    def on_step(step):
        if step == 0:
            seen["rounding"] = RoundingLevel(seen["model"])
        lrs.append([float(g["lr"]) for g in seen["optimizer"].param_groups])
        if states is not None and step > 0:
            states[step] = v4_state(saved_state(out)["model"])
    return on_step


# ----------------------------------------------------------------------------- inputs

def test_preprocessing_and_theta0_match_the_release(golden, theta0_dir, tmp_path):
    """θ₀ loads with every tensor equal (the sin-cos tables included) and our normalisation of the uint8
    images gives the release's pixel values bit for bit; the processor file's settings are the ones used."""
    expected, batch, _ = golden
    mae = load_mae(theta0_dir)
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    ours = v4_state(mae.state_dict())
    assert sorted(ours) == sorted(theta0)
    for name, value in theta0.items():
        assert torch.equal(ours[name], value), name
    args = pretrain.get_args_parser().parse_args(["--dataset", "golden", "--model_name", theta0_dir,
                                                  "--device", "cpu", "--output_dir", str(tmp_path / "r")])
    from models import preprocessing_of
    run = training.Run(args, args.output_dir, "further-pretrain", str(tmp_path / "r" / "done"), preprocessing_of(theta0_dir))
    pre = run.preprocessing
    assert (pre.size, pre.resample, list(pre.mean), list(pre.std)) == (
        32, 2, expected["preprocessing"]["image_mean"], expected["preprocessing"]["image_std"])
    assert torch.equal(run.normalize(batch["images_uint8"]), batch["pixel_values"])


# ----------------------------------------------------------------------------- stage 1

def test_further_pretraining_main_matches_the_release(golden, theta0_dir, golden_data, tmp_path, monkeypatch):
    """pretrain.main with its defaults (20,000 steps, lr 1.5e-4, no warmup, betas (0.9, 0.95), weight decay
    0.01 off biases and 1-D tensors, mask 0.75, norm_pix_loss), cut after 2 steps as the release was."""
    expected, batch, release = golden
    out = tmp_path / "further-pretrain"
    seen, lrs, states = spy_prepare(monkeypatch), [], {}
    with pytest.raises(Cut):
        run_main(pretrain, stage_argv(theta0_dir, golden_data, out, "--save_every", 1),
                 ReleaseDraws(batch, stop=2, on_step=observe_steps(seen, lrs, out, states)))

    frozen = sorted(v4_name(n) for n, p in seen["model"].named_parameters() if not p.requires_grad)
    assert frozen == sorted(expected["pretrain"]["frozen"]), f"further pre-training: frozen {frozen}"
    assert_optimizer(seen, expected["pretrain"], lrs, "further pre-training")
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    assert v4_state(seen["start"]).keys() == theta0.keys()
    assert all(torch.equal(v4_state(seen["start"])[k], theta0[k]) for k in theta0), "further pre-training: not from θ₀"
    assert_losses(metrics(out, "mae_loss"), expected["pretrain"]["loss"], "further pre-training: MAE loss")
    assert metrics(out, "lr") == pytest.approx(expected["pretrain"]["lr"], rel=1e-12), "further pre-training: logged lr"
    for step in (1, 2):
        trainable = {k: v for k, v in states[step].items() if k not in expected["pretrain"]["frozen"]}
        assert_params(trainable, release, f"pretrain/after_step{step}/", f"further pre-training step {step}",
                      seen["rounding"], sum(expected["pretrain"]["lr"][:step]))
        for name in expected["pretrain"]["frozen"]:  # the sin-cos tables never move
            assert torch.equal(states[step][name], theta0[name]), f"further pre-training moved {name}"


# ----------------------------------------------------------------------------- stage 2

def test_self_distillation_main_matches_the_release(golden, theta0_dir, golden_data, tmp_path, monkeypatch):
    """selftrain.main with its defaults: the student is θ₀ again (encoder and decoder), the teacher the
    release's model.pt at the default place (<checkpoint_dir>/further-pretrain-20000/golden/), λ = 1; cut
    after 2 steps."""
    expected, batch, release = golden
    checkpoints, out = tmp_path / "checkpoints", tmp_path / "self-distill"
    teacher_pt = checkpoints / "further-pretrain-20000" / "golden" / "model.pt"
    teacher_pt.parent.mkdir(parents=True)
    teacher_state = load_file(os.path.join(GOLDEN, "teacher.safetensors"))  # the release's 4.17 names, no prefix
    torch.save({"args": argparse.Namespace(steps=3), "state_dict": teacher_state}, teacher_pt)
    seen, lrs, states, inputs = spy_prepare(monkeypatch), [], {}, []

    def record(student, images, noise, teacher_cls, distill_weight):
        with torch.no_grad():
            inputs.append({"teacher_cls": teacher_cls.clone(), "student_cls": cls_feature(student.mae.vit, images),
                           "distill_weight": distill_weight})
    spy(monkeypatch, selftrain, "training_loss", record)
    with pytest.raises(Cut):
        run_main(selftrain, stage_argv(theta0_dir, golden_data, out, "--checkpoint_dir", checkpoints,
                                       "--save_every", 1),
                 ReleaseDraws(batch, stop=2, on_step=observe_steps(seen, lrs, out, states)))

    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    start = v4_state(seen["start"])
    assert start.keys() == theta0.keys() and all(torch.equal(start[k], theta0[k]) for k in theta0), \
        "self-distillation: the student does not start from θ₀ (encoder and decoder)"
    assert_optimizer(seen, expected["selftrain"], lrs, "self-distillation")
    for step, seen_step in enumerate(inputs):
        assert seen_step["distill_weight"] == expected["selftrain"]["lambda"], "self-distillation: λ"
        torch.testing.assert_close(seen_step["teacher_cls"], release["selftrain/teacher_cls"][step][ORDER],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"self-distillation step {step + 1}: the "
                                   f"teacher features of the batch are not the teacher's h(x) of its images: {m}")
        torch.testing.assert_close(seen_step["student_cls"], release["selftrain/student_cls"][step][ORDER],
                                   rtol=1e-5, atol=1e-5, msg=lambda m: f"self-distillation step {step + 1}: "
                                   f"student h(x): {m}")
    for key, logged in (("mae_loss", "mae_loss"), ("distill_loss", "distill_loss"), ("total_loss", "loss")):
        assert_losses(metrics(out, logged), expected["selftrain"][key], f"self-distillation: {key}")
    for step in (1, 2):
        trainable = {k: v for k, v in states[step].items() if k not in expected["selftrain"]["frozen"]}
        assert_params(trainable, release, f"selftrain/after_step{step}/", f"self-distillation step {step}",
                      seen["rounding"], sum(expected["selftrain"]["lr"][:step]))


# ----------------------------------------------------------------------------- stage 3

def test_finetuning_main_and_evaluation_match_the_release(golden, theta0_dir, golden_data, tmp_path, monkeypatch):
    """finetune.main from θ₀ (the release's `--scratch True` path) with its defaults (lr 1e-4, 500 warmup
    steps, betas (0.9, 0.999), weight decay 0.01 except bias/position_embeddings/cls_token, clipping at 1.0,
    flip with probability 0.5) and the fixture's dropout 0; --steps 3 has the release's schedule for these 3
    warm-up steps (its cross-check: bit-identical to the cut 10,000-step run), so main() runs to the end:
    evaluation on the test split and the saved classifier. The 3 steps barely move the weights (lr 0, 2e-7,
    4e-7): the UPDATE θ₃ − θ_init is compared, to 5e-9; a missing step fails."""
    expected, batch, release = golden
    out, results = tmp_path / "finetune", tmp_path / "results"
    head = {k: release[f"finetune/head_init/{k}"] for k in ("classifier.weight", "classifier.bias")}
    real_build = finetune.build_classifier

    def build_classifier(*a, **kw):  # the release's seeded head, in the model main() built
        model = real_build(*a, **kw)
        with torch.no_grad():
            for name, value in head.items():
                model.get_parameter(name).copy_(value)
        return model
    monkeypatch.setattr(finetune, "build_classifier", build_classifier)
    seen, lrs, steps = spy_prepare(monkeypatch), [], []

    def record(classifier, images, labels, flip):
        if not steps:
            with torch.no_grad():
                x = torch.where(flip[:, None, None, None], images.flip(-1), images)
                steps.append({"logits": classifier(x).logits})
        steps.append({"labels": labels.clone(), "flip": flip.clone()})
    spy(monkeypatch, finetune, "training_loss", record)
    run_main(finetune, stage_argv(theta0_dir, golden_data, out, "--scratch", "True", "--dropout", 0, "--steps", 3,
                                  "--results_dir", results, "--save_model"),
             ReleaseDraws(batch, on_step=observe_steps(seen, lrs)))

    assert not [n for n, p in seen["model"].named_parameters() if not p.requires_grad], "fine-tuning froze something"
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    start = v4_state(seen["start"])
    for name, value in {**{k: v for k, v in theta0.items() if k.startswith("vit.")}, **head}.items():
        assert torch.equal(start[name], value), f"fine-tuning from θ₀ does not start from θ₀'s {name}"
    assert_optimizer(seen, expected["finetune"], lrs, "fine-tuning")
    torch.testing.assert_close(steps[0]["logits"], release["finetune/logits_step1"][ORDER], rtol=1e-5, atol=1e-6,
                               msg=lambda m: f"fine-tuning: logits of step 1 (flipped batch): {m}")
    for k, step in enumerate(steps[1:]):
        assert torch.equal(step["labels"], batch["labels"][ORDER]), f"fine-tuning step {k + 1}: labels not the images'"
        assert torch.equal(step["flip"], batch["flips"][k][ORDER]), \
            f"fine-tuning step {k + 1}: flipped {step['flip'].int().tolist()}, the release {batch['flips'][k][ORDER].int().tolist()}"
    assert_losses(metrics(out, "cls_loss"), expected["finetune"]["loss"], "fine-tuning: cross-entropy")
    assert metrics(out, "lr") == pytest.approx(expected["finetune"]["lr"], rel=1e-12, abs=1e-20), "fine-tuning: lr"
    assert_losses(metrics(out, "grad_norm"), expected["finetune"]["grad_norm_preclip"], "fine-tuning: grad norm")

    # the saved classifier is the trained one: its update against the release's
    saved = ViTForImageClassification.from_pretrained(str(out / "model"))
    after = v4_state(dict(saved.named_parameters()))
    initial = {**{k: v for k, v in theta0.items() if k.startswith("vit.")}, **head}
    update = {k: after[k] - initial[k] for k in after}
    release_update = {"finetune/after_step3/" + k: release["finetune/after_step3/" + k] - initial[k] for k in initial}
    assert max(v.abs().max().item() for v in update.values()) > 1e-7, "fine-tuning did not move the weights"
    # measured: the updates agree to 2.2e-9; Σlr = 6e-7, so 5e-9 is 0.8 % of the whole update
    assert_params(update, release_update, "finetune/after_step3/", "fine-tuning update", seen["rounding"],
                  sum(expected["finetune"]["lr"]), atol=5e-9)

    # evaluation, once, after the last step, on the test split: the release's test() on the same 8 images
    result = json.load(open(f"{out}.json"))
    assert (result["num_test"], result["test_acc"]) == (8, expected["finetune"]["test_acc"]), \
        f"fine-tuning: test accuracy {result['test_acc']} on {result['num_test']} images"
    # one batch, so the release's mean of per-batch means equals our per-sample mean
    assert_losses([result["test_loss"]], [expected["finetune"]["test_loss"]], "fine-tuning: test loss")


def test_finetuning_from_a_checkpoint_starts_from_exactly_its_encoder(golden, theta0_dir, golden_data, tmp_path,
                                                                       monkeypatch):
    """--scratch False --ckpt_name NAME: the classifier main() trains starts from every encoder tensor of
    <checkpoint_dir>/NAME/<dataset> -- here the release's own teacher model.pt -- and only the head is new."""
    checkpoints = tmp_path / "checkpoints"
    teacher_pt = checkpoints / "the-release-teacher" / "golden" / "model.pt"
    teacher_pt.parent.mkdir(parents=True)
    teacher = load_file(os.path.join(GOLDEN, "teacher.safetensors"))  # the release's 4.17 names, no `vit.`
    torch.save({"args": argparse.Namespace(steps=3), "state_dict": teacher}, teacher_pt)
    seen = spy_prepare(monkeypatch)
    args = finetune.get_args_parser().parse_args([str(a) for a in stage_argv(
        theta0_dir, golden_data, tmp_path / "ft", "--checkpoint_dir", checkpoints, "--ckpt_name", "the-release-teacher",
        "--results_dir", tmp_path / "results")])
    with training.supplied_draws(cut_at(stop=0)), pytest.raises(Cut):
        finetune.main(args)
    start = v4_state(seen["start"])
    assert sorted(start) == sorted(["vit." + k for k in teacher] + ["classifier.weight", "classifier.bias"])
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    for name, value in teacher.items():
        assert torch.equal(start["vit." + name], value), f"fine-tuning does not start from the checkpoint's {name}"
    moved = [k for k in teacher if not torch.equal(teacher[k], theta0["vit." + k])]
    assert len(moved) > 50, "the teacher should differ from θ₀ (else this test could not tell them apart)"
