"""Our stage code against the authors' release itself.

tests/golden/ holds numbers that the release's unmodified code computed on transformers 4.17 for a tiny
ViT-MAE (tests/golden/README.md says exactly how): θ₀ and a teacher in the release's 4.x names, a batch,
masking noise, labels and flips; the losses of each step, all parameters after 2 further pre-training
steps, 2 self-distillation steps and 3 fine-tuning steps, the learning rates, and the evaluation.

Each test runs the functions the scripts run -- loading (`load_mae`, the release `model.pt` reader),
`Run.adamw` (the stage's weight-decay groups, AdamW, the linear schedule), `Run.train_step` with the
stage's `training_loss` (forward, backward, clipping, optimizer and schedule step), the teacher's
features (`selftrain.teacher_features`) and `finetune.evaluate` --
from the fixture's inputs, and compares: losses to 1e-5 relative, parameters to 1e-5 absolute (or
tighter, where the fixture's README says the numbers are small or sensitive). Comparing transformers 5
with itself could not catch what transformers changed between 4.17 and 5 (the trainable sin-cos
tables, found this way); this can.
"""
import argparse
import functools
import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file

import finetune
import mae_common
import pretrain
import selftrain
import utils
from models import MAEWithFeature, build_classifier, cls_feature, load_encoder, load_mae, preprocessing_of

from conftest import GOLDEN
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5
# AdamW's first steps move a weight by about lr·g/(|g| + eps), eps = 1e-8. Where a gradient element is
# itself at rounding level (below 10·eps: a bias whose true gradient is zero, such as attention's key bias,
# or a unit that barely contributes), that ratio -- and so the step -- is decided by rounding, in the release
# as in ours, and may differ by up to a whole step. Measured here: 6 of 164k elements after further
# pre-training's first step, all with |g| < 1.4e-8. Those elements are allowed ROUNDING_STEPS · Σ lr.
ROUNDING_GRAD = 1e-7
ROUNDING_STEPS = 3


# transformers 5 parameter names -> the release's (4.17) names
_TO_V4 = [(r"\.attention\.q_proj\.", ".attention.attention.query."),
          (r"\.attention\.k_proj\.", ".attention.attention.key."),
          (r"\.attention\.v_proj\.", ".attention.attention.value."),
          (r"\.attention\.o_proj\.", ".attention.output.dense."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."),
          (r"\.mlp\.fc2\.", ".output.dense."),
          (r"^vit\.layers\.", "vit.encoder.layer.")]


def v4_name(name: str) -> str:
    for pattern, old in _TO_V4:
        name = re.sub(pattern, old, name)
    return name


def v4_state(model: torch.nn.Module, trainable_only: bool = True) -> dict:
    return {v4_name(n): p.detach().clone() for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only}


def make_run(tmp_path, parser, stage, model_dir, *flags):
    """A Run for the fixture's setting: CPU, fp32, batch 8, a metrics line every step."""
    args = parser.parse_args(["--dataset", "golden", "--model_name", model_dir, "--device", "cpu",
                              "--batch_size", "8", "--workers", "0", "--log_every", "1",
                              "--output_dir", str(tmp_path / stage), *flags])
    return args, utils.Run(args, args.output_dir, stage, str(tmp_path / stage / "done"), preprocessing_of(model_dir))


def metrics(run, key: str) -> list[float]:
    """`key` of every step, from the run's metrics.jsonl (a line per step: --log_every 1)."""
    with open(os.path.join(run.out_dir, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def golden_dataset(batch) -> list:
    """The fixture's 8 images as a dataset of (uint8 (3, 32, 32), label), in the release's order."""
    return list(zip(batch["images_uint8"], batch["labels"].tolist()))


def assert_losses(ours, release, what):
    torch.testing.assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(release, dtype=torch.float64),
                               rtol=LOSS_RTOL, atol=0, msg=lambda m: f"{what}: {m}")


class RoundingLevelGradients:
    """Records, through parameter hooks, which elements ever had a gradient below ROUNDING_GRAD in
    magnitude during the backward passes that Run.step makes."""

    def __init__(self, model: torch.nn.Module):
        self.mask = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                self.mask[v4_name(name)] = torch.zeros_like(param, dtype=torch.bool)
                param.register_hook(functools.partial(self._record, v4_name(name)))

    def _record(self, name: str, grad: torch.Tensor) -> None:  # returns None: the gradient is unchanged
        self.mask[name].logical_or_(grad.abs() < ROUNDING_GRAD)

    def allowance(self, lr_sum: float) -> dict:
        return {name: mask.float() * ROUNDING_STEPS * lr_sum for name, mask in self.mask.items()}


def assert_params(ours: dict, release: dict, prefix: str, atol=PARAM_ATOL, rtol=0.0, allowance=None):
    """Every tensor to atol + rtol·|release|, plus `allowance` (per element) where gradients were at rounding level."""
    names = sorted(k[len(prefix):] for k in release if k.startswith(prefix))
    assert sorted(ours) == names, "the trainable parameters differ from the release's"
    for name in names:
        expected = release[prefix + name]
        bound = atol + rtol * expected.abs() + (allowance[name] if allowance else 0.0)
        excess = (ours[name] - expected).abs() - bound
        assert excess.max() <= 0, (f"{prefix}{name}: {int((excess > 0).sum())} element(s) differ from the release "
                                   f"by more than allowed (max excess {excess.max().item():.3g})")


def group_names(model, no_weight_decay, weight_decay=0.01) -> dict:
    """{weight decay: sorted 4.17 names} of the optimizer groups our stage builds."""
    ids = {id(p): v4_name(n) for n, p in model.named_parameters()}
    return {g["weight_decay"]: sorted(ids[id(p)] for p in g["params"])
            for g in utils.param_groups(model, weight_decay, no_weight_decay)}


def release_groups(expected_stage: dict) -> dict:
    return {g["weight_decay"]: sorted(g["params"]) for g in expected_stage["param_groups"]}


# ----------------------------------------------------------------------------- inputs

def test_preprocessing_and_theta0_match_the_release(golden, theta0_dir, tmp_path):
    """θ₀ loads with every tensor equal (the sin-cos tables included) and our normalisation of the uint8
    images gives the release's pixel values bit for bit; the processor file's settings are the ones used."""
    expected, batch, _ = golden
    mae = load_mae(theta0_dir)
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    ours = v4_state(mae, trainable_only=False)
    assert sorted(ours) == sorted(theta0)
    for name, value in theta0.items():
        assert torch.equal(ours[name], value), name
    _, run = make_run(tmp_path, pretrain.get_args_parser(), "further-pretrain", theta0_dir)
    pre = run.preprocessing
    assert (pre.size, pre.resample, list(pre.mean), list(pre.std)) == (
        32, 2, expected["preprocessing"]["image_mean"], expected["preprocessing"]["image_std"])
    assert torch.equal(run.normalize(batch["images_uint8"]), batch["pixel_values"])


# ----------------------------------------------------------------------------- stage 1

def test_further_pretraining_matches_the_release(golden, theta0_dir, tmp_path):
    expected, batch, release = golden
    args, run = make_run(tmp_path, pretrain.get_args_parser(), "further-pretrain", theta0_dir)
    assert (args.steps, args.lr, args.warmup_steps, args.weight_decay) == (20000, 1.5e-4, 0, 0.01)
    mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)
    assert sorted(v4_name(n) for n, p in mae.named_parameters() if not p.requires_grad) == \
        sorted(expected["pretrain"]["frozen"])
    assert group_names(mae, mae_common.no_weight_decay) == release_groups(expected["pretrain"])
    optimizer, scheduler = run.adamw(mae, mae_common.no_weight_decay, mae_common.MAE_BETAS)
    model = run.prepare(mae, optimizer, scheduler)
    model.train()
    rounding = RoundingLevelGradients(mae)
    objective = functools.partial(pretrain.training_loss, model)
    lrs = []
    for step in range(2):
        lrs.append(optimizer.param_groups[0]["lr"])
        run.train_step(step, objective, batch["pixel_values"], batch["noise"][step])
        assert_params(v4_state(mae), release, f"pretrain/after_step{step + 1}/",
                      allowance=rounding.allowance(sum(lrs)))
    losses = metrics(run, "mae_loss")
    assert_losses(losses, expected["pretrain"]["loss"], "MAE loss")
    assert lrs == pytest.approx(expected["pretrain"]["lr"], rel=1e-12)
    assert metrics(run, "lr") == pytest.approx(expected["pretrain"]["lr"], rel=1e-12)  # the record says so too
    # the frozen sin-cos tables never move
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))
    for name in expected["pretrain"]["frozen"]:
        assert torch.equal(v4_state(mae, trainable_only=False)[name], theta0[name])


# ----------------------------------------------------------------------------- stage 2

def test_self_distillation_matches_the_release(golden, theta0_dir, tmp_path):
    """The teacher is read from a release `model.pt` (pickled {"args", "state_dict"}, 4.x names), the
    student is θ₀ again. The distillation term is sensitive in this tiny random model (the fixture's
    README): the student's parameters are compared with a relative tolerance on top of the absolute one."""
    expected, batch, release = golden
    teacher_pt = tmp_path / "further-pretrain-20000" / "golden" / "model.pt"
    teacher_pt.parent.mkdir(parents=True)
    teacher_state = load_file(os.path.join(GOLDEN, "teacher.safetensors"))  # the release's 4.17 names, no prefix
    torch.save({"args": argparse.Namespace(steps=3), "state_dict": teacher_state}, teacher_pt)
    args, run = make_run(tmp_path, selftrain.get_args_parser(), "self-distill", theta0_dir,
                         "--checkpoint_dir", str(tmp_path))
    assert args.distill_weight == 1.0
    student_mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)
    teacher = load_encoder(str(teacher_pt.parent), args.model_name, reference=student_mae.config)
    teacher.eval().requires_grad_(False)
    assert group_names(student_mae, mae_common.no_weight_decay) == release_groups(expected["selftrain"])
    optimizer, scheduler = run.adamw(student_mae, mae_common.no_weight_decay, mae_common.MAE_BETAS)
    student = run.prepare(MAEWithFeature(student_mae), optimizer, scheduler)
    teacher_cls = selftrain.teacher_features(teacher, run.device, run, golden_dataset(batch))  # (8, D), once
    torch.testing.assert_close(teacher_cls, release["selftrain/teacher_cls"][0], rtol=1e-5, atol=1e-5)
    assert torch.equal(release["selftrain/teacher_cls"][0], release["selftrain/teacher_cls"][1])  # frozen teacher
    student.train()
    rounding = RoundingLevelGradients(student_mae)
    objective = functools.partial(selftrain.training_loss, student, distill_weight=args.distill_weight)
    lr_sum = 0.0
    x = batch["pixel_values"]
    for step in range(2):
        with torch.no_grad():
            student_cls = cls_feature(student_mae.vit, x)
        torch.testing.assert_close(student_cls, release["selftrain/student_cls"][step], rtol=1e-5, atol=1e-5)
        lr_sum += optimizer.param_groups[0]["lr"]
        run.train_step(step, objective, x, batch["noise"][step], teacher_cls[torch.arange(8)])
        assert_params(v4_state(student_mae), release, f"selftrain/after_step{step + 1}/", rtol=1e-4,
                      allowance=rounding.allowance(lr_sum))
    got = {"mae_loss": metrics(run, "mae_loss"), "distill_loss": metrics(run, "distill_loss"),
           "total_loss": metrics(run, "loss")}
    for key, values in got.items():
        assert_losses(values, expected["selftrain"][key], key)


# ----------------------------------------------------------------------------- stage 3

def test_finetuning_and_evaluation_match_the_release(golden, theta0_dir, tmp_path):
    """From θ₀ (the release's `--scratch True` path) with the release's seeded head. The 3 steps fall inside
    the 500-step warm-up (lr 0, 2e-7, 4e-7), so the parameters barely move (max 6e-7): the UPDATE
    θ₃ − θ_init is compared, to 1e-8 absolute plus 1e-3 relative; a missing step (2e-7 or 4e-7) fails."""
    expected, batch, release = golden
    args, run = make_run(tmp_path, finetune.get_args_parser(), "finetune", theta0_dir, "--scratch", "True",
                         "--dropout", "0")
    assert (args.steps, args.lr, args.warmup_steps, args.clip_grad) == (10000, 1e-4, 500, 1.0)
    initial = load_mae(args.model_name)  # what finetune.main does for --scratch True
    model = build_classifier(initial.config, initial.vit.state_dict(), expected["finetune"]["num_classes"],
                             args.dropout)
    with torch.no_grad():
        model.classifier.weight.copy_(release["finetune/head_init/classifier.weight"])
        model.classifier.bias.copy_(release["finetune/head_init/classifier.bias"])
    assert not any(not p.requires_grad for p in model.parameters())  # nothing frozen in fine-tuning
    assert group_names(model, finetune.no_weight_decay) == release_groups(expected["finetune"])
    before = v4_state(model)
    optimizer, scheduler = run.adamw(model, finetune.no_weight_decay, finetune.FINETUNE_BETAS)
    classifier = run.prepare(model, optimizer, scheduler)
    classifier.train()
    rounding = RoundingLevelGradients(model)
    x, labels, flips = batch["pixel_values"], batch["labels"], batch["flips"]
    with torch.no_grad():  # step 1's logits, on the flipped batch
        logits = model(torch.where(flips[0][:, None, None, None], x.flip(-1), x)).logits
    torch.testing.assert_close(logits, release["finetune/logits_step1"], rtol=1e-5, atol=1e-6)
    objective = functools.partial(finetune.training_loss, classifier)
    lrs = []
    for step in range(3):
        lrs.append(optimizer.param_groups[0]["lr"])
        run.train_step(step, objective, x, labels, flips[step])
    losses = metrics(run, "cls_loss")
    assert_losses(losses, expected["finetune"]["loss"], "cross-entropy")
    assert lrs == pytest.approx(expected["finetune"]["lr"], rel=1e-12, abs=1e-20)
    assert metrics(run, "lr") == pytest.approx(expected["finetune"]["lr"], rel=1e-12, abs=1e-20)
    assert_losses(metrics(run, "grad_norm"), expected["finetune"]["grad_norm_preclip"],
                  "pre-clip gradient norm")
    after = v4_state(model)
    update = {k: after[k] - before[k] for k in after}
    release_update = {"finetune/after_step3/" + k: release["finetune/after_step3/" + k] - before[k] for k in before}
    assert max(v.abs().max().item() for v in update.values()) > 1e-7  # the steps did move the weights
    assert_params(update, release_update, "finetune/after_step3/", atol=1e-8, rtol=1e-3,
                  allowance=rounding.allowance(sum(lrs)))

    # evaluation, once, after the last step: the release's test() on the same 8 images
    result = finetune.evaluate(model, run, golden_dataset(batch))
    assert result["acc"] == expected["finetune"]["test_acc"]
    # one batch, so the release's mean of per-batch means equals our per-sample mean
    assert_losses([result["loss"]], [expected["finetune"]["test_loss"]], "test loss")
