"""The three stages end to end, on vit-mae-tiny and `digits`, and the release's checkpoints as their inputs. (The
method's pieces on fixed inputs: tests/unit/test_method.py.)"""
import argparse
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
import pretrain
import selftrain
import training
import utils
from models import build_classifier, load_encoder, load_encoder_state, load_mae

from helpers import mae_weights, metrics


# ----------------------------------------------------------------------------- the stages

def test_pretrain_writes_a_checkpoint_that_stock_from_pretrained_opens(stage_args, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--plot")))
    out = tmp_path / "ckpt" / "further-pretrain-4" / "digits"
    saved = mae_weights(out)  # stock from_pretrained
    initial = load_mae("vit-mae-tiny")
    assert set(saved) == set(initial.state_dict())  # decoder included
    assert len(load_file(os.path.join(out, "model.safetensors"))) == len(saved)
    assert not torch.equal(saved["vit.layers.0.mlp.fc1.weight"], initial.state_dict()["vit.layers.0.mlp.fc1.weight"])
    record = json.load(open(out / "args.json"))
    assert record["args"]["steps"] == 4 and record["versions"]["torch"] == torch.__version__
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert not (out / training.STATE_FILE).exists()
    # every file we write loads without pickled objects
    for name in os.listdir(out):
        assert not name.endswith((".pt", ".bin", ".pkl"))
    # --plot: one panel per loss term (here mae_loss) and the learning rate, 4 x 3.2 inches each at 100 dpi
    with Image.open(out / "loss_curves.png") as png:
        assert png.format == "PNG" and png.size == (800, 320)


def test_same_seed_same_numbers_other_seed_other_numbers(stage_args, tmp_path):
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        pretrain.main(pretrain.get_args_parser().parse_args(
            stage_args("--seed", seed, "--output_dir", tmp_path / name)))
        runs[name] = [m["loss"] for m in metrics(tmp_path / name)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_selftrain_student_starts_from_initial_weights_and_never_touches_the_teacher(stage_args, tmp_path,
                                                                                     monkeypatch):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args()))
    teacher_dir = tmp_path / "ckpt" / "further-pretrain-4" / "digits"
    seen = {}
    real_load_encoder, real_prepare = selftrain.load_encoder, training.Run.prepare

    def spy_load_encoder(path, name, reference):
        seen["teacher"] = real_load_encoder(path, name, reference)
        return seen["teacher"]

    def spy_prepare(self, model, optimizer, scheduler):
        seen["student_start"] = {k: v.clone() for k, v in model.mae.state_dict().items()}
        return real_prepare(self, model, optimizer, scheduler)

    monkeypatch.setattr(selftrain, "load_encoder", spy_load_encoder)
    monkeypatch.setattr(training.Run, "prepare", spy_prepare)
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args()))

    initial = load_mae("vit-mae-tiny").state_dict()
    assert all(torch.equal(v, initial[k]) for k, v in seen["student_start"].items())  # θ₀, decoder included
    teacher_saved = mae_weights(teacher_dir)
    teacher = seen["teacher"]
    assert not teacher.training
    for name, param in teacher.named_parameters():
        assert param.grad is None and not param.requires_grad
        assert torch.equal(param.detach(), teacher_saved["vit." + name])  # unchanged by the 4 steps
    assert not torch.equal(teacher_saved["vit.layers.0.mlp.fc1.weight"], initial["vit.layers.0.mlp.fc1.weight"])
    rows = metrics(tmp_path / "ckpt" / "self-further-pretrain-4" / "digits")
    for r in rows:
        assert r["loss"] == pytest.approx(r["mae_loss"] + r["distill_loss"], rel=1e-5)
        assert r["distill_loss"] > 0


def test_distill_weight_zero_reproduces_further_pretraining_exactly(stage_args, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=5)))
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args("--distill_weight", 0, steps=5)))
    a = tmp_path / "ckpt" / "further-pretrain-5" / "digits"
    b = tmp_path / "ckpt" / "self-further-pretrain-5" / "digits"
    assert [m["mae_loss"] for m in metrics(a)] == [m["mae_loss"] for m in metrics(b)]
    wa, wb = mae_weights(a), mae_weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finetune_loads_every_encoder_tensor_and_only_the_head_is_new(stage_args, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args()))
    ckpt = tmp_path / "ckpt" / "further-pretrain-4" / "digits"
    config, state = load_encoder_state(str(ckpt), "vit-mae-tiny")
    model = build_classifier(config, state, num_classes=10, dropout=0.1)
    saved = mae_weights(ckpt)
    own = model.state_dict()
    new = {k for k in own if not k.startswith("vit.")}
    assert new == {"classifier.weight", "classifier.bias"}
    for k in own:
        if k.startswith("vit."):
            assert torch.equal(own[k], saved[k]), k
    assert model.config.hidden_dropout_prob == 0.1


def test_finetune_writes_results_with_accuracy_and_loss(stage_args, tmp_path):
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args()))
    argv = stage_args("--ckpt_name", "further-pretrain-4", "--results_dir", tmp_path / "res", "--seed", 2,
                      "--warmup_steps", 1, "--val_split", 0.2, steps=6)
    finetune.main(finetune.get_args_parser().parse_args(argv))
    result = json.load(open(tmp_path / "res" / "digits" / "further-pretrain-4" / "seed2.json"))
    assert 0.0 <= result["test_acc"] <= 1.0 and result["test_loss"] > 0
    assert result["num_test"] == 500 and result["num_val"] == round(1297 * 0.2)
    assert result["args"]["seed"] == 2 and result["init"] == "further-pretrain-4"
    # the release's recipe is the default
    defaults = finetune.get_args_parser().parse_args(["--dataset", "cub"])
    assert (defaults.steps, defaults.batch_size, defaults.lr, defaults.warmup_steps, defaults.clip_grad) == \
        (10000, 32, 1e-4, 500, 1.0)


# ----------------------------------------------------------------------------- checkpoints of the release

def _to_v4(key: str) -> str:
    """transformers 5 encoder name -> the 4.x name the release's model.pt holds (written out by hand)."""
    key = key.replace("layers.", "encoder.layer.")
    for new, old in (("attention.q_proj", "attention.attention.query"), ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"), ("attention.o_proj", "attention.output.dense"),
                     ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense")):
        key = key.replace(new, old)
    return key


def test_release_model_pt_loads_as_teacher_and_for_finetuning(stage_args, tmp_path):
    trained = load_mae("vit-mae-tiny")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    v4_state = {_to_v4(k): v for k, v in trained.vit.state_dict().items()}
    assert "encoder.layer.0.attention.attention.query.weight" in v4_state
    release_dir = tmp_path / "ckpt" / "further-pretrain-4" / "digits"
    release_dir.mkdir(parents=True)
    torch.save({"args": argparse.Namespace(lr=1.5e-4, dataset="digits"), "state_dict": v4_state},
               release_dir / "model.pt")
    teacher = load_encoder(str(release_dir), "vit-mae-tiny", trained.config)
    for k, v in trained.vit.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v)
    # the self-distillation stage takes it as its default teacher, and fine-tuning as a checkpoint
    selftrain.main(selftrain.get_args_parser().parse_args(stage_args(steps=4)))
    assert (tmp_path / "ckpt" / "self-further-pretrain-4" / "digits" / "model.safetensors").exists()
    finetune.main(finetune.get_args_parser().parse_args(
        stage_args("--ckpt_name", "further-pretrain-4", "--results_dir", tmp_path / "res", steps=2)))
    assert (tmp_path / "res" / "digits" / "further-pretrain-4" / "seed0.json").exists()


