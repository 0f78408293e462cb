"""The paper's recipe in one table, checked against what the code does when nobody passes a flag: the parsers'
defaults, what each stage's main() builds from them (the model's configuration, the optimizer, its groups and
schedule, dropout, the batch it trains on), and what the launchers pass to the scripts.

RECIPE is the authors' release (README, "Flags and hyperparameters"; tests/golden/ for the numbers a 2-step run
cannot show, such as beta2). The stage runs here use vit-mae-tiny on digits (ViT-B/16 needs the Hub), everything else
at its default, cut after one step of the 20,000 / 10,000 (helpers.cut_at: the schedule is the recipe's)."""
import json
import os
import stat
import subprocess
import sys

import pytest
import torch

import finetune
import pretrain
import selftrain
import training
import utils
from models import load_mae, save_model

from helpers import Cut, REPO, cut_at, spy, spy_prepare

MAE_STAGE = dict(steps=20000, batch_size=64, lr=1.5e-4, warmup_steps=0, weight_decay=0.01, clip_grad=None,
                 mask_ratio=0.75, norm_pix_loss=True, model_name="facebook/vit-mae-base", seed=0)
RECIPE = {
    "further-pretrain": dict(
        MAE_STAGE, betas=(0.9, 0.95), eps=1e-8, hidden_dropout=0.0, attention_dropout=0.0,
        no_decay="1-D tensors and biases"),
    "self-distill": dict(
        MAE_STAGE, betas=(0.9, 0.95), eps=1e-8, hidden_dropout=0.0, attention_dropout=0.0,
        no_decay="1-D tensors and biases", distill_weight=1.0, teacher="<checkpoint_dir>/further-pretrain-<steps>/<dataset>"),
    "finetune": dict(
        steps=10000, batch_size=32, lr=1e-4, warmup_steps=500, weight_decay=0.01, clip_grad=1.0, seed=0,
        model_name="facebook/vit-mae-base", scratch=False, ckpt_name="self-further-pretrain-20000", val_split=0.0,
        betas=(0.9, 0.999), eps=1e-8, hidden_dropout=0.1, attention_dropout=0.0,
        no_decay="names containing bias, position_embeddings or cls_token"),
}
# schedule of every stage: linear warmup from 0 over warmup_steps, then linear decay to 0 at the last step
FLAGS = {"further-pretrain": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "clip_grad",
                              "mask_ratio", "norm_pix_loss", "model_name", "seed"),
         "self-distill": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "clip_grad", "mask_ratio",
                          "norm_pix_loss", "model_name", "seed", "distill_weight"),
         "finetune": ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "clip_grad", "model_name", "seed",
                      "scratch", "ckpt_name", "val_split")}
SCRIPTS = {"further-pretrain": pretrain, "self-distill": selftrain, "finetune": finetune}


def no_decay_by_recipe(stage: str, name: str, param) -> bool:
    """The recipe's rule (README, "Flags and hyperparameters"), written from the paper's side: which parameters
    get no weight decay."""
    if stage == "finetune":
        return any(word in name for word in ("bias", "position_embeddings", "cls_token"))
    return param.ndim <= 1 or name.endswith(".bias")


def schedule_by_recipe(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor of step `step` (0-based): linear warmup from 0, then linear decay to 0."""
    return step / warmup if step < warmup else (total - step) / (total - warmup)


@pytest.mark.parametrize("stage", list(RECIPE))
def test_parser_defaults_are_the_recipe(stage):
    args = SCRIPTS[stage].get_args_parser().parse_args(["--dataset", "cub"])
    for flag in FLAGS[stage]:
        assert getattr(args, flag) == RECIPE[stage][flag], \
            f"{stage}: --{flag} defaults to {getattr(args, flag)!r}, the recipe says {RECIPE[stage][flag]!r}"
    if stage == "self-distill":
        assert args.teacher is None  # derived: <checkpoint_dir>/further-pretrain-<steps>/<dataset>


def _tiny_checkpoint(path):
    save_model(load_mae("vit-mae-tiny"), str(path))


def _start_with_defaults(stage, data_dir, tmp_path, monkeypatch, *flags):
    """One step of the stage's main() with every recipe flag at its default but `flags` (the model: vit-mae-tiny;
    the data: digits; the device: CPU); -> (args, what Run.prepare got, the inputs of the step's training_loss)."""
    checkpoints = tmp_path / "checkpoints"
    if stage == "self-distill":  # the teacher where selftrain looks by default
        _tiny_checkpoint(checkpoints / "further-pretrain-20000" / "digits")
    if stage == "finetune":  # the checkpoint fine-tuning starts from by default
        _tiny_checkpoint(checkpoints / "self-further-pretrain-20000" / "digits")
    seen, inputs = spy_prepare(monkeypatch), []
    spy(monkeypatch, SCRIPTS[stage], "training_loss", lambda *a, **kw: inputs.append((a, kw)))
    args = SCRIPTS[stage].get_args_parser().parse_args(
        ["--dataset", "digits", "--data_dir", data_dir, "--model_name", "vit-mae-tiny", "--device", "cpu",
         "--workers", "0", "--checkpoint_dir", str(checkpoints), "--output_dir", str(tmp_path / "run"), *flags])
    with training.supplied_draws(cut_at(stop=1)), pytest.raises(Cut):
        SCRIPTS[stage].main(args)
    return args, seen, inputs


@pytest.mark.parametrize("stage", list(RECIPE))
def test_main_builds_the_recipe(stage, data_dir, tmp_path, monkeypatch):
    """The optimizer main() hands to the run (betas, eps, learning rate, weight decay and which parameters get
    none, the schedule over the default steps), the model's dropout and masking settings, and the batch of a
    training step."""
    recipe = RECIPE[stage]
    args, seen, inputs = _start_with_defaults(stage, data_dir, tmp_path, monkeypatch)
    model, optimizer, scheduler = seen["model"], seen["optimizer"], seen["scheduler"]

    # ---- AdamW and its two groups
    groups = {g["weight_decay"]: g for g in optimizer.param_groups}
    assert sorted(groups) == [0.0, recipe["weight_decay"]], f"{stage}: weight decays {sorted(groups)}"
    for wd, group in groups.items():
        assert (tuple(group["betas"]), group["eps"], group["initial_lr"]) == (recipe["betas"], recipe["eps"],
                                                                               recipe["lr"]), \
            f"{stage}: group wd={wd}: betas {group['betas']}, eps {group['eps']}, lr {group['initial_lr']}"
        assert not group["amsgrad"] and not group["maximize"], f"{stage}: AdamW variant"
    by_id = {id(p): (n, p) for n, p in model.named_parameters()}
    for wd, group in groups.items():
        for p in group["params"]:
            name, param = by_id[id(p)]
            assert no_decay_by_recipe(stage, name, param) == (wd == 0.0), \
                f"{stage}: {name} gets weight decay {wd}; the recipe: none on {recipe['no_decay']}"
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    left_out = sorted(n for n, p in model.named_parameters() if id(p) not in trained)
    frozen = ["vit.embeddings.position_embeddings", "decoder.decoder_pos_embed"] if stage != "finetune" else []
    assert [n.removeprefix("mae.") for n in left_out] == sorted(frozen), f"{stage}: not trained: {left_out}"

    # ---- the schedule over the recipe's steps
    for step in (0, 1, recipe["warmup_steps"] // 2, recipe["warmup_steps"], recipe["steps"] // 2, recipe["steps"] - 1):
        expected = schedule_by_recipe(step, recipe["warmup_steps"], recipe["steps"])
        assert scheduler.lr_lambdas[0](step) == pytest.approx(expected, rel=1e-12, abs=1e-15), \
            f"{stage}: learning-rate factor at step {step}: {scheduler.lr_lambdas[0](step)}, the recipe's {expected}"

    # ---- the model: dropout, masking
    config = model.config if stage != "self-distill" else model.mae.config
    assert (config.hidden_dropout_prob, config.attention_probs_dropout_prob) == (
        recipe["hidden_dropout"], recipe["attention_dropout"]), f"{stage}: dropout (hidden, attention)"
    rates = sorted({m.p for m in model.modules() if "Dropout" in type(m).__name__ and m.p > 0})
    assert rates == ([recipe["hidden_dropout"]] if recipe["hidden_dropout"] else []), f"{stage}: dropout layers {rates}"
    if stage != "finetune":
        assert (config.mask_ratio, config.norm_pix_loss) == (recipe["mask_ratio"], recipe["norm_pix_loss"]), \
            f"{stage}: mask ratio {config.mask_ratio}, norm_pix_loss {config.norm_pix_loss}"
    else:  # a new linear head, initialised as transformers does: N(0, initializer_range = 0.02), bias 0
        weight, bias = seen["start"]["classifier.weight"], seen["start"]["classifier.bias"]
        assert 0.017 < weight.std().item() < 0.023 and abs(weight.mean().item()) < 0.003, "the new head's init"
        assert not bias.any(), "the new head's bias is not zero"

    # ---- the step: the recipe's batch, one training_loss call, λ
    assert len(inputs) == 1, f"{stage}: {len(inputs)} training_loss calls in one step"
    a, kw = inputs[0]
    assert a[1].shape[0] == recipe["batch_size"], f"{stage}: a step trains on {a[1].shape[0]} images"
    if stage == "self-distill":
        assert kw["distill_weight"] == recipe["distill_weight"], f"λ = {kw['distill_weight']}"
    if stage != "finetune":
        assert a[2].shape == (recipe["batch_size"], 64), f"{stage}: masking noise {tuple(a[2].shape)}"


NOT_DEFAULT = {"further-pretrain": ["--mask_ratio", "0.5", "--norm_pix_loss", "False", "--lr", "3e-4", "--warmup_steps",
                                    "7", "--weight_decay", "0.05", "--batch_size", "16"],
               "self-distill": ["--mask_ratio", "0.5", "--norm_pix_loss", "False", "--distill_weight", "0.5",
                                "--batch_size", "16"],
               "finetune": ["--dropout", "0.2", "--lr", "3e-4", "--weight_decay", "0.05", "--batch_size", "16"]}


@pytest.mark.parametrize("stage", list(RECIPE))
def test_main_builds_what_the_flags_say(stage, data_dir, tmp_path, monkeypatch):
    """Each recipe flag reaches what main() builds: none is ignored in favour of its default."""
    args, seen, inputs = _start_with_defaults(stage, data_dir, tmp_path, monkeypatch, *NOT_DEFAULT[stage])
    model, optimizer = seen["model"], seen["optimizer"]
    config = model.config if stage != "self-distill" else model.mae.config
    assert {g["initial_lr"] for g in optimizer.param_groups} == {args.lr}
    assert sorted(g["weight_decay"] for g in optimizer.param_groups) == [0.0, args.weight_decay]
    assert inputs[0][0][1].shape[0] == args.batch_size
    if stage == "finetune":
        assert config.hidden_dropout_prob == 0.2 and {m.p for m in model.modules() if "Dropout" in type(m).__name__
                                                      and m.p > 0} == {0.2}, "--dropout"
    else:
        assert (config.mask_ratio, config.norm_pix_loss) == (0.5, False), "--mask_ratio / --norm_pix_loss"
    if stage == "further-pretrain":
        assert seen["scheduler"].lr_lambdas[0](3) == pytest.approx(3 / 7), "--warmup_steps"
    if stage == "self-distill":
        assert inputs[0][1]["distill_weight"] == 0.5, "--distill_weight"


# ----------------------------------------------------------------------------- the launchers

def _recording_python(tmp_path):
    """A $PYTHON that writes each call's arguments as a JSON line instead of running anything."""
    calls = tmp_path / "calls.jsonl"
    script = tmp_path / "python"
    script.write_text(f"#!/usr/bin/env bash\nexec {sys.executable} -c 'import json, sys; "
                      f"print(json.dumps(sys.argv[1:]))' \"$@\" >> {calls}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script), calls


def _launcher_calls(tmp_path, command: str, env: dict | None = None) -> list[tuple[str, object]]:
    python, calls = _recording_python(tmp_path)
    proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHON": python, **(env or {})})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parsed = []
    for line in calls.read_text().splitlines():
        argv = json.loads(line)
        script = os.path.basename(argv[0])
        stage = {"pretrain.py": "further-pretrain", "selftrain.py": "self-distill", "finetune.py": "finetune"}.get(script)
        parsed.append((stage or script, SCRIPTS[stage].get_args_parser().parse_args(argv[1:]) if stage else argv))
    return parsed


def _assert_recipe(stage, args, **launcher_sets):
    for flag in FLAGS[stage]:
        wanted = launcher_sets.get(flag, RECIPE[stage][flag])
        assert getattr(args, flag) == wanted, \
            f"the launcher runs {stage} with --{flag} {getattr(args, flag)!r}; the recipe: {wanted!r}"


def test_the_stage_launchers_run_the_recipe(tmp_path):
    for launcher, stage in (("run_pretrain.sh", "further-pretrain"), ("run_selftrain.sh", "self-distill")):
        (call,) = _launcher_calls(tmp_path, f"bash {REPO}/{launcher} cpu cub")
        assert call[0] == stage
        _assert_recipe(stage, call[1])
        (tmp_path / "calls.jsonl").unlink()
    for extra, scratch in (("", False), (" True", True)):
        calls = _launcher_calls(tmp_path, f"bash {REPO}/run_finetune.sh cpu cub{extra}")
        runs = [args for stage, args in calls if stage == "finetune"]
        assert sorted(a.seed for a in runs) == [1, 2, 3, 4, 5], "run_finetune.sh: the paper's 5 seeds"
        for args in runs:
            _assert_recipe("finetune", args, seed=args.seed, scratch=scratch)
        assert calls[-1][0] == "report.py"
        (tmp_path / "calls.jsonl").unlink()


def test_run_all_runs_the_whole_table_with_the_recipe(tmp_path):
    calls = _launcher_calls(tmp_path, f"bash {REPO}/run_all.sh cpu cub")
    stages = [stage for stage, _ in calls]
    assert stages[:2] == ["further-pretrain", "self-distill"]
    for stage, args in calls[:2]:
        _assert_recipe(stage, args)
    runs = [args for stage, args in calls if stage == "finetune"]
    routes = sorted({("initial" if a.scratch else a.ckpt_name) for a in runs})
    assert routes == ["further-pretrain-20000", "initial", "self-further-pretrain-20000"]
    for args in runs:
        _assert_recipe("finetune", args, seed=args.seed, scratch=args.scratch, ckpt_name=args.ckpt_name)
    assert sorted((a.scratch, a.ckpt_name, a.seed) for a in runs if not a.scratch) == sorted(
        (False, route, seed) for route in ("further-pretrain-20000", "self-further-pretrain-20000") for seed in range(1, 6))
    assert sorted(a.seed for a in runs if a.scratch) == [1, 2, 3, 4, 5]


def test_run_all_gives_mae_flags_and_finetune_flags_to_their_stages_only(tmp_path):
    """make demo's way of giving the MAE stages and fine-tuning their own learning rates."""
    calls = _launcher_calls(tmp_path, f"bash {REPO}/run_all.sh cpu cub --workers 1",
                            {"MAE_FLAGS": "--lr 1e-3", "FINETUNE_FLAGS": "--lr 3e-3 --warmup_steps 40",
                             "SEEDS": "1"})
    stages = {stage: [a for s, a in calls if s == stage] for stage in RECIPE}
    assert [a.lr for a in stages["further-pretrain"] + stages["self-distill"]] == [1e-3, 1e-3]
    assert [(a.lr, a.warmup_steps, a.workers) for a in stages["finetune"]] == [(3e-3, 40, 1)] * 3
    assert stages["further-pretrain"][0].warmup_steps == 0 and stages["further-pretrain"][0].workers == 1
    proc = subprocess.run(["bash", f"{REPO}/run_all.sh", "cpu", "cub"], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": "false", "FINETUNE_FLAGS": "--seed 3"}, cwd=tmp_path)
    assert proc.returncode == 2 and "FINETUNE_FLAGS" in proc.stderr and "--seed" in proc.stderr
