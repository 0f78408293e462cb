"""What each stage's main() wires together, checked from outside on digits with the real data order: fine-tuning
starts from exactly the checkpoint it names; the teacher's features of every batch are the teacher's h(x) of that
batch's images; evaluation runs once, after the last step, in eval mode, on the test split; the saved classifier
is the model that was trained and evaluated. (tests/test_golden.py checks the same against the release's numbers
on its 8 images.)"""
import json

import pytest
import torch
from transformers import ViTForImageClassification, ViTMAEForPreTraining

import finetune
import pretrain
import selftrain
import training
import utils
from data import ImageDataset
from models import cls_feature, load_mae

from helpers import cut_at, spy, spy_prepare


def _pretrain(stage_args, tmp_path, steps=4):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=steps)))
    return tmp_path / "ckpt" / f"further-pretrain-{steps}" / "digits"


def test_fine_tuning_starts_from_exactly_the_checkpoint_it_names(stage_args, tmp_path, monkeypatch):
    checkpoint = ViTMAEForPreTraining.from_pretrained(str(_pretrain(stage_args, tmp_path))).vit.state_dict()
    theta0 = load_mae("vit-mae-tiny").vit.state_dict()
    seen = spy_prepare(monkeypatch)
    finetune.main(finetune.get_args_parser().parse_args(stage_args(
        "--ckpt_name", "further-pretrain-4", "--results_dir", tmp_path / "res", steps=1)))
    start = {k.removeprefix("vit."): v for k, v in seen["start"].items() if k.startswith("vit.")}
    assert sorted(start) == sorted(checkpoint)
    for name, value in checkpoint.items():
        assert torch.equal(start[name], value), f"fine-tuning does not start from the checkpoint's {name}"
    assert sum(not torch.equal(checkpoint[k], theta0[k]) for k in theta0) > 30  # the checkpoint is not θ₀
    assert sorted(k for k in seen["start"] if not k.startswith("vit.")) == ["classifier.bias", "classifier.weight"]


def test_teacher_features_of_each_batch_are_the_teachers_features_of_its_images(stage_args, tmp_path, monkeypatch):
    teacher_dir = _pretrain(stage_args, tmp_path)
    teacher = ViTMAEForPreTraining.from_pretrained(str(teacher_dir)).vit.eval()  # read back by stock transformers
    student_start = load_mae("vit-mae-tiny").vit.eval()
    steps = []
    spy(monkeypatch, selftrain, "training_loss",
        lambda student, images, noise, teacher_cls, distill_weight: steps.append((images.clone(), teacher_cls.clone())))
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args("--seed", 5, "--teacher", teacher_dir, steps=6)))
    assert len(steps) == 6
    with torch.no_grad():
        for k, (images, teacher_cls) in enumerate(steps):
            torch.testing.assert_close(teacher_cls, cls_feature(teacher, images), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"step {k + 1}: the distillation target is not the teacher's "
                                                     f"h(x) of the batch's images: {m}")
            assert not torch.allclose(teacher_cls, cls_feature(student_start, images), atol=1e-3), \
                "the distillation target is θ₀'s feature, not the teacher's"


def test_evaluation_runs_once_after_the_last_step_in_eval_mode_on_the_test_split(stage_args, data_dir, tmp_path,
                                                                                  monkeypatch):
    seen, calls, started = spy_prepare(monkeypatch), [], []

    def record(model, run, dataset):
        split = getattr(dataset, "split", None) or f"{dataset.dataset.split} (part)"  # a Subset: the images trained on
        calls.append({"steps_done": len(started), "split": split, "n": len(dataset),
                      "state": {k: v.clone() for k, v in model.state_dict().items()}})
    spy(monkeypatch, finetune, "evaluate", record)
    argv = finetune.get_args_parser().parse_args(stage_args(
        "--scratch", "True", "--results_dir", tmp_path / "res", "--save_model", "--lr", "1e-3", "--warmup_steps", 0, steps=6))
    with training.supplied_draws(cut_at(on_step=started.append)):
        finetune.main(argv)
    assert [(c["steps_done"], c["split"], c["n"]) for c in calls] == [(6, "test", 500), (6, "train (part)", 1297)], \
        f"evaluation: {[(c['steps_done'], c['split'], c['n']) for c in calls]}; wanted once, after all 6 steps, on " \
        f"test (and the training accuracy on the images trained on)"
    result = json.load(open(tmp_path / "res" / "digits" / "initial" / "seed0.json"))
    assert (result["num_test"], result["num_train"]) == (500, 1297)

    # the saved classifier is the evaluated one, which is the trained one (dropout 0.1: eval mode matters)
    saved = ViTForImageClassification.from_pretrained(str(tmp_path / "res" / "digits" / "initial" / "seed0" / "model"))
    evaluated = calls[0]["state"]
    assert all(torch.equal(saved.state_dict()[k], evaluated[k]) for k in evaluated), "saved ≠ evaluated"
    assert any(not torch.equal(seen["start"][k], evaluated[k]) for k in evaluated), "the evaluated model did not train"
    assert saved.config.hidden_dropout_prob == 0.1
    test = ImageDataset("digits", "test", data_dir, 32)
    images = torch.stack([test[i][0] for i in range(len(test))])
    labels = torch.tensor([test[i][1] for i in range(len(test))])
    x = seen["run"].normalize(images)
    with torch.no_grad():
        logits = saved.eval()(x).logits
        train_mode = saved.train()(x).logits
    assert result["test_acc"] == (logits.argmax(-1) == labels).sum().item() / len(labels)
    assert result["test_loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert result["test_loss"] != pytest.approx(torch.nn.functional.cross_entropy(train_mode, labels).item(), rel=1e-3)
