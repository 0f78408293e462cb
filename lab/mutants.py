"""Does the test suite notice a departure from the recipe? Small edits that a careless port or a refactor
could make, applied one at a time to a scratch copy of the repository; the fidelity tests run after each, and
the edits they miss are listed. A test proves something only if it fails when the code is wrong.

    python -m lab.mutants                      # every edit below, against FIDELITY_TESTS (~20 min on 2 cores)
    python -m lab.mutants --only flip teacher  # the edits whose names contain these words
    python -m lab.mutants --tests tests        # against the whole suite (for the ones that survive)

Each edit replaces one exact piece of text that must occur exactly once in its file (so an edit that no
longer applies after a change is reported, not skipped). The copy holds the tracked and untracked files of
this checkout (not the ignored ones); .venv is linked, not copied. Nothing here changes the checkout.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIDELITY_TESTS = ["tests/test_golden.py", "tests/test_recipe.py", "tests/test_randomness.py",
                  "tests/test_stage_wiring.py", "tests/test_pipeline.py", "tests/unit/test_method.py",
                  "tests/unit/test_invariants.py", "tests/test_conditions_the_suite_varies.py",
                  "tests/test_roberta_mlm.py", "tests/test_text_stages.py"]


class Edit(NamedTuple):
    name: str
    path: str
    old: str
    new: str


EDITS = [
    # ---- which weights go where
    Edit("finetune reads the checkpoint but trains from θ₀'s encoder", "models/vit_mae.py",
         "    return load_encoder_state(checkpoint, model_name)\n",
         "    return load_encoder_state(checkpoint, model_name)[0], load_mae(model_name).vit.state_dict()\n"),
    Edit("finetune never reads the checkpoint", "models/vit_mae.py",
         "    if scratch:\n        initial = load_mae(model_name)",
         "    if True:\n        initial = load_mae(model_name)"),
    Edit("selftrain student starts from the teacher", "selftrain.py",
         "    teacher = load_encoder(teacher_path, args.model_name, reference=student_mae.config)\n",
         "    teacher = load_encoder(teacher_path, args.model_name, reference=student_mae.config)\n"
         "    student_mae.vit.load_state_dict(teacher.state_dict())\n"),
    Edit("selftrain teacher is θ₀", "selftrain.py",
         "    teacher = load_encoder(teacher_path, args.model_name, reference=student_mae.config)",
         "    teacher = load_mae(args.model_name).vit"),
    Edit("selftrain teacher lookup one row off", "selftrain.py",
         "noise, teacher_table[index])", "noise, teacher_table[(index + 1) % len(teacher_table)])"),
    Edit("selftrain teacher lookup by batch position", "selftrain.py",
         "noise, teacher_table[index])", "noise, teacher_table[:len(index)])"),
    Edit("selftrain teacher in train mode", "selftrain.py",
         "eval().requires_grad_(False)\n    preprocessing", "train().requires_grad_(False)\n    preprocessing"),
    Edit("selftrain ignores --mask_ratio", "selftrain.py",
         "student_mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)",
         "student_mae = load_mae(args.model_name, 0.75, args.norm_pix_loss)"),
    Edit("pretrain ignores --norm_pix_loss", "pretrain.py",
         "mae = load_mae(args.model_name, args.mask_ratio, args.norm_pix_loss)",
         "mae = load_mae(args.model_name, args.mask_ratio)"),
    Edit("finetune ignores --dropout", "finetune.py",
         "model = build_classifier(config, encoder_state, full_train.num_classes(), args.dropout, args.drop_path,",
         "model = build_classifier(config, encoder_state, full_train.num_classes(), 0.1, args.drop_path,"),
    Edit("finetune head starts at zero", "models/vit_mae.py",
         "    model = ViTForImageClassification(vit_config)\n",
         "    model = ViTForImageClassification(vit_config)\n    model.classifier.weight.data.zero_()\n"),
    Edit("finetune flips vertically", "finetune.py",
         "images = torch.where(flip[:, None, None, None], images.flip(-1), images)",
         "images = torch.where(flip[:, None, None, None], images.flip(-2), images)"),
    Edit("selftrain teacher features on masked images", "models/vit_mae.py",
         "    with _no_masking(encoder.config):\n        hidden = encoder(pixel_values, noise=in_order)",
         "    if True:\n        hidden = encoder(pixel_values, noise=in_order)"),
    # ---- the flip, the split, evaluation
    Edit("finetune flip probability 0", "finetune.py",
         "flip = run.global_rand(step, utils.STREAM_FLIP) < 0.5",
         "flip = run.global_rand(step, utils.STREAM_FLIP) < 0.0"),
    Edit("finetune flip probability 0.4", "finetune.py",
         "flip = run.global_rand(step, utils.STREAM_FLIP) < 0.5",
         "flip = run.global_rand(step, utils.STREAM_FLIP) < 0.4"),
    Edit("finetune flips the labels' rows the other way", "finetune.py",
         "images = torch.where(flip[:, None, None, None], images.flip(-1), images)",
         "images = torch.where(flip[:, None, None, None], images, images.flip(-1))"),
    Edit("finetune evaluates the training split", "finetune.py",
         "test = evaluate(model, run, test_set)", "test = evaluate(model, run, train_set)"),
    Edit("finetune evaluates in train mode", "finetune.py",
         "    model.eval()\n    correct", "    model.train()\n    correct"),
    Edit("finetune evaluates the initial model", "finetune.py",
         "    test = evaluate(model, run, test_set)",
         "    model.load_state_dict(build_classifier(config, encoder_state, full_train.num_classes(), "
         "args.dropout).state_dict())\n    test = evaluate(model, run, test_set)"),
    # ---- recipe defaults
    Edit("finetune dropout default 0", "finetune.py",
         'type=utils.finite_float(0, 1, high_open=True), default=0.1,',
         'type=utils.finite_float(0, 1, high_open=True), default=0.0,'),
    Edit("finetune attention dropout = dropout", "models/vit_mae.py",
         "hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0",
         "hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout"),
    Edit("finetune weight decay default 0", "training/mae_recipe.py",
         'randaug="none", schedule="linear", weight_decay=0.01),',
         'randaug="none", schedule="linear", weight_decay=0.0),'),
    Edit("finetune warmup default 0", "finetune.py",
         "warmup_steps=utils.not_given(500),", "warmup_steps=utils.not_given(0),"),
    Edit("finetune lr default 1e-3", "finetune.py", "lr=utils.not_given(1e-4),", "lr=utils.not_given(1e-3),"),
    Edit("finetune no clipping by default", "finetune.py",
         "not_given(500), clip_grad=1.0,", "not_given(500), clip_grad=None,"),
    Edit("finetune batch default 64", "finetune.py",
         "batch_size=utils.not_given(32),", "batch_size=utils.not_given(64),"),
    Edit("MAE batch default 32", "utils.py",
         'type=int_at_least(1), default=not_given(64),', 'type=int_at_least(1), default=not_given(32),'),
    Edit("MAE steps default 10000 (stages and launchers)", "paper.py", "MAE_STEPS = 20000", "MAE_STEPS = 10000"),
    Edit("MAE mask ratio default 0.6", "mae_common.py",
         "default=utils.not_given(0.75),", "default=utils.not_given(0.6),"),
    Edit("MAE norm_pix_loss default off", "mae_common.py",
         "type=utils.str2bool, default=True,", "type=utils.str2bool, default=False,"),
    Edit("selftrain λ default 0.5", "selftrain.py",
         'type=utils.finite_float(0), default=1.0,', 'type=utils.finite_float(0), default=0.5,'),
    Edit("selftrain ignores λ", "selftrain.py", "return mae + distill_weight * distill,", "return mae + distill,"),
    # ---- optimizer and schedule
    Edit("MAE betas (0.9, 0.999)", "mae_common.py", "MAE_BETAS = (0.9, 0.95)", "MAE_BETAS = (0.9, 0.999)"),
    Edit("finetune betas (0.9, 0.95)", "finetune.py", "FINETUNE_BETAS = (0.9, 0.999)", "FINETUNE_BETAS = (0.9, 0.95)"),
    Edit("AdamW eps 1e-6", "training/step.py",
         "        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=",
         "        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-6, fused="),
    Edit("MAE weight decay on 1-D tensors", "mae_common.py",
         "return param.ndim <= 1 or name.endswith(\".bias\")", "return name.endswith(\".bias\")"),
    Edit("finetune weight decay on cls_token", "finetune.py",
         'NO_DECAY_NAMES = ("bias", "position_embeddings", "cls_token")',
         'NO_DECAY_NAMES = ("bias", "position_embeddings")'),
    Edit("schedule: no decay after warmup", "training/step.py",
         "        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))", "        return 1.0"),
    Edit("schedule: one step late", "training/step.py",
         "    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)",
         "    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: factor(step + 1))"),
    Edit("no gradient clipping", "training/step.py",
         "            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)",
         "            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, float('inf'))"),
    Edit("sin-cos tables trainable", "models/vit_mae.py",
         "        mae.get_parameter(name).requires_grad_(False)",
         "        mae.get_parameter(name).requires_grad_(True)"),
    # ---- losses
    Edit("distillation loss averaged over dimensions too", "selftrain.py",
         "return (student_cls.float() - teacher_cls.detach().float()).pow(2).sum(dim=-1).mean()",
         "return (student_cls.float() - teacher_cls.detach().float()).pow(2).mean()"),
    Edit("cross-entropy with label smoothing", "finetune.py",
         "        loss = F.cross_entropy(logits.float(), labels)",
         "        loss = F.cross_entropy(logits.float(), labels, label_smoothing=0.1)"),
    # ---- randomness
    Edit("data order: the identity", "training/draws.py",
         "return torch.randperm(self.n, generator=generator(self.seed, STREAM_ORDER, epoch))",
         "return torch.arange(self.n)"),
    Edit("data order: the same permutation every epoch", "training/draws.py",
         "generator=generator(self.seed, STREAM_ORDER, epoch))", "generator=generator(self.seed, STREAM_ORDER, 0))"),
    Edit("masking noise shared by the batch", "training/draws.py",
         "drawn = [torch.rand(self.global_batch, *shape, generator=generator(self.seed, stream, s))[rows]",
         "drawn = [torch.rand(1, *shape, generator=generator(self.seed, stream, s))"
         ".expand(self.global_batch, *shape)[rows]"),
    Edit("masking noise the same every step", "training/draws.py",
         "generator=generator(self.seed, stream, s))[rows]", "generator=generator(self.seed, stream, 0))[rows]"),
    Edit("dropout not rescaled", "training/draws.py",
         "return x * (noise >= self.p) / (1 - self.p)", "return x * (noise >= self.p)"),
    Edit("dropout seed the same every step", "training/draws.py",
         "return mix_seed(self.seed, STREAM_DROPOUT, step)", "return mix_seed(self.seed, STREAM_DROPOUT, 0)"),
    Edit("dropout not seeded per step", "training/run.py",
         "        torch.manual_seed(self.draws.dropout_seed(step))  # GlobalBatchDropout",
         "        # GlobalBatchDropout"),
    # ---- what a suite that holds one condition fixed misses: logging every step, the decoded data, one seed,
    # one precision
    Edit("clipping only at logging steps", "training/step.py",
         "if self.clipping or need_norm or self.static:", "if need_norm or self.static:"),
    Edit("non-finite check at logging steps only", "training/run.py",
         "        if logging or saving:\n", "        if logging:\n"),
    Edit("non-finite flag never set", "training/step.py",
         "        self.bad.copy_(torch.where(torch.isfinite(loss.detach()) | (self.bad > 0), self.bad, self.done))\n",
         ""),
    Edit("streamed evaluation drops the last batch", "training/batches.py",
         "indices.tolist()), batch_size=self.local_batch)",
         "indices.tolist()), batch_size=self.local_batch, drop_last=True)"),
    Edit("streamed training restarts the data order on resume", "training/batches.py",
         "len(dataset), start_step,", "len(dataset), 0,"),
    Edit("new head seeded with a constant", "models/vit_mae.py",
         "torch.manual_seed(mix_seed(seed, rank))", "torch.manual_seed(mix_seed(0, rank))"),
    Edit("dropout seed ignores --seed", "training/draws.py",
         "return mix_seed(self.seed, STREAM_DROPOUT, step)", "return mix_seed(0, STREAM_DROPOUT, step)"),
    Edit("flips and masking noise ignore --seed", "training/draws.py",
         "generator=generator(self.seed, stream, s)", "generator=generator(0, stream, s)"),
    Edit("data order ignores --seed", "training/draws.py",
         "generator=generator(self.seed, STREAM_ORDER, epoch)", "generator=generator(0, STREAM_ORDER, epoch)"),
    Edit("pixels not normalised (only /255)", "training/batches.py",
         "return (images - self.mean) / self.std", "return images"),
    Edit("ImageNet mean applied, not the model's", "training/batches.py",
         "torch.tensor(preprocessing.mean,", "torch.tensor((0.485, 0.456, 0.406),"),
    Edit("report averages precisions together", "report.py",
         'NUMERICS = ("precision", "device_type")', 'NUMERICS = ("device_type",)'),
    # ---- the text half
    Edit("text: h(x) on the masked text", "models/roberta_mlm.py",
         "first_token_feature(self.mlm.roberta, input_ids, attention_mask))",
         "first_token_feature(self.mlm.roberta, masked_ids, attention_mask))"),
    Edit("text: MLM selects special tokens and padding", "models/roberta_mlm.py",
         "selected = (noise[..., 0] < mlm_probability) & ~special_mask", "selected = noise[..., 0] < mlm_probability"),
    Edit("text: MLM rate default 0.2", "text_common.py", "lr=1e-4, mask_ratio=0.15)", "lr=1e-4, mask_ratio=0.2)"),
    Edit("text: classifier head seeded with a constant", "models/roberta_mlm.py",
         "torch.manual_seed(mix_seed(seed, STREAM_HEAD))", "torch.manual_seed(mix_seed(0, STREAM_HEAD))"),
    Edit("text: MLM loss averaged per process", "training/run.py",
         "return max(total, 1.0) / (self.accum_steps * self.process.world)",
         "return max(float(count), 1.0) / self.accum_steps"),
    Edit("text: the teacher is θ₀", "selftrain.py",
         "teacher = load_mlm(teacher_path).roberta", "teacher = load_mlm(args.model_name).roberta"),
    Edit("text: fine-tuning weight decay default 0.01", "text_common.py", "lr=2e-5, weight_decay=0.1)",
         "lr=2e-5, weight_decay=0.01)"),
    # ---- launchers
    Edit("launchers: 3 seeds", "paper.py", 'SEEDS = ("1", "2", "3", "4", "5")', 'SEEDS = ("1", "2", "3")'),
    Edit("the table: self-distillation route fine-tunes the teacher", "launch/graph.py",
         '*route(d, student(mae_steps), (f"{d} selftrain",))', '*route(d, teacher(mae_steps), (f"{d} selftrain",))'),
    Edit("run_finetune.sh: from θ₀ by default", "launch/launchers.py",
         '["False", graph.student(graph.MAE_STEPS), "checkpoints"]',
         '["True", graph.student(graph.MAE_STEPS), "checkpoints"]'),
]


def copy_checkout(into: str) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = os.path.join(REPO, rel)
        if os.path.isfile(src) and not os.path.islink(src):
            os.makedirs(os.path.dirname(os.path.join(into, rel)), exist_ok=True)
            shutil.copy2(src, os.path.join(into, rel))
    os.symlink(os.path.join(REPO, ".venv"), os.path.join(into, ".venv"))


def apply(root: str, edit: Edit) -> str | None:
    """Applies the edit; returns why it cannot be applied, or None."""
    path = os.path.join(root, edit.path)
    with open(path) as f:
        text = f.read()
    if text.count(edit.old) != 1:
        return f"the text to replace occurs {text.count(edit.old)} times in {edit.path}"
    with open(path, "w") as f:
        f.write(text.replace(edit.old, edit.new))
    return None


def first_failure(output: str) -> str:
    """The first 'FAILED test - reason' line pytest printed (or the last line)."""
    lines = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return (lines[0] if lines else output.strip().splitlines()[-1] if output.strip() else "")[:220]


def main(args) -> int:
    edits = [e for e in EDITS if not args.only or any(w.lower() in e.name.lower() for w in args.only)]
    python = os.path.join(REPO, ".venv", "bin", "python")
    survived, broken = [], []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        pristine = os.path.join(tmp, "pristine")
        copy_checkout(pristine)
        for k, edit in enumerate(edits, 1):
            root = os.path.join(tmp, f"m{k}")
            shutil.copytree(pristine, root, symlinks=True)
            problem = apply(root, edit)
            if problem:
                broken.append(edit.name)
                print(f"[{k}/{len(edits)}] {edit.name}: NOT APPLIED ({problem})", flush=True)
                continue
            start = time.perf_counter()
            proc = subprocess.run([python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args.tests], cwd=root,
                                  capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            took = time.perf_counter() - start
            if proc.returncode == 0:
                survived.append(edit.name)
                print(f"[{k}/{len(edits)}] {edit.name}: SURVIVED ({took:.0f} s)", flush=True)
            else:
                print(f"[{k}/{len(edits)}] {edit.name}: caught ({took:.0f} s) {first_failure(proc.stdout)}", flush=True)
            shutil.rmtree(root)
    print(f"\n{len(edits) - len(survived) - len(broken)} of {len(edits)} edits caught; survived: "
          f"{survived or 'none'}; not applicable: {broken or 'none'}")
    return 1 if survived or broken else 0


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Small departures from the recipe, one at a time: does the suite fail?",
                                allow_abbrev=False)
    p.add_argument("--only", nargs="+", default=None, help="only the edits whose names contain one of these words")
    p.add_argument("--tests", nargs="+", default=FIDELITY_TESTS, help="pytest paths to run after each edit")
    return p


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
