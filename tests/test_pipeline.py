"""The method's invariants and the three stages end to end, on vit-mae-tiny and `digits`."""
import argparse
import json
import os
import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import ViTConfig, ViTMAEForPreTraining, ViTModel

import finetune
import mae_common
import pretrain
import selftrain
import training
import utils
from data import ImageDataset, LMDBReader
from models import (build_classifier, cls_feature, load_encoder, load_encoder_state, load_mae, mae_loss,

                    save_model)

from helpers import mae_weights, metrics


# ----------------------------------------------------------------------------- the two representations

def test_mae_loss_equals_transformers_own_loss_and_the_formula(tmp_path):
    ours = load_mae("vit-mae-tiny", mask_ratio=0.75, norm_pix_loss=True)
    save_model(ours, str(tmp_path))
    stock = ViTMAEForPreTraining.from_pretrained(str(tmp_path))  # config carries mask_ratio and norm_pix_loss
    x = torch.randn(4, 3, 32, 32)
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(1))
    loss = mae_loss(ours, x, noise)
    out = stock(x, noise=noise)
    assert torch.equal(loss, out.loss)
    # the paper's formula, by hand: per-patch normalised targets, MSE averaged over the masked patches only
    target = stock.patchify(x)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((out.logits - target) ** 2).mean(-1)
    assert out.mask.sum(1).eq(48).all()  # 75 % of 64 patches hidden
    torch.testing.assert_close(loss, (per_patch * out.mask).sum() / out.mask.sum())


def test_distillation_feature_is_the_cls_output_of_a_stock_vit_on_the_unmasked_image():
    mae = load_mae("vit-mae-tiny").eval()
    c = mae.config
    vit = ViTModel(ViTConfig(hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                             num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
                             image_size=c.image_size, patch_size=c.patch_size, layer_norm_eps=c.layer_norm_eps),
                   add_pooling_layer=False).eval()
    assert not vit.load_state_dict(mae.vit.state_dict(), strict=False).unexpected_keys
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feature = cls_feature(mae.vit, x)
        expected = vit(x).last_hidden_state[:, 0]
    assert feature.shape == (3, c.hidden_size)
    torch.testing.assert_close(feature, expected, rtol=0, atol=1e-6)
    assert mae.config.mask_ratio == 0.75  # masking is back on afterwards


def test_distill_loss_is_mean_over_batch_of_squared_distance_summed_over_dims():
    s, t = torch.randn(5, 7, requires_grad=True), torch.randn(5, 7, requires_grad=True)
    loss = selftrain.distill_loss(s, t)
    torch.testing.assert_close(loss, sum(((s[i] - t[i]) ** 2).sum() for i in range(5)) / 5)
    loss.backward()
    assert t.grad is None  # stop-gradient on the teacher


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


def test_single_backward_gives_the_gradients_of_two_separate_backwards():
    """The release back-propagated the MAE and the distillation losses in two passes; one pass is the same."""
    from models import MAEWithFeature
    x, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    teacher = torch.randn(4, 64)
    grads = []
    for passes in (1, 2):
        student = MAEWithFeature(load_mae("vit-mae-tiny"))
        mae, feature = student(x, noise)
        distill = selftrain.distill_loss(feature, teacher)
        if passes == 1:
            (mae + distill).backward()
        else:
            mae.backward()
            selftrain.distill_loss(cls_feature(student.mae.vit, x), teacher).backward()
        grads.append({n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)
    # the decoder gets MAE gradient only: the same with and without the distillation term
    student = MAEWithFeature(load_mae("vit-mae-tiny"))
    student(x, noise)[0].backward()
    for n, p in student.named_parameters():
        if n.startswith("mae.decoder.") and p.requires_grad:
            torch.testing.assert_close(grads[0][n], p.grad, rtol=1e-5, atol=1e-7)


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


def test_finetune_weight_decay_groups_follow_the_release():
    model = build_classifier(load_mae("vit-mae-tiny").config, load_mae("vit-mae-tiny").vit.state_dict(), 3, 0.1)
    decay, no_decay = training.param_groups(model, 0.01, finetune.no_weight_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    no_names = {names[id(p)] for p in no_decay["params"]}
    assert "vit.embeddings.cls_token" in no_names and "vit.embeddings.position_embeddings" in no_names
    assert "vit.layers.0.layernorm_before.weight" not in no_names  # LayerNorm weights are decayed
    assert all(n.endswith("bias") or "embeddings" in n for n in no_names)
    mae = load_mae("vit-mae-tiny")
    decay, no_decay = training.param_groups(mae, 0.01, mae_common.no_weight_decay)
    assert all(p.ndim <= 1 for p in no_decay["params"]) and all(p.ndim > 1 for p in decay["params"])
    assert all(p is not mae.vit.embeddings.position_embeddings for p in decay["params"] + no_decay["params"])


def test_linear_schedule_warms_up_then_decays_to_zero():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = training.linear_schedule(opt, warmup_steps=2, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    lrs.append(sched.get_last_lr()[0])
    assert lrs == [0.0, 0.5, 1.0, 0.75, 0.5, 0.25, 0.0]


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


def test_release_lmdb_layout_is_read(tmp_path):
    """A fixture written by hand in the release's format, not by our writer."""
    import io

    import lmdb
    from PIL import Image
    path = str(tmp_path / "toy" / "train.lmdb")
    os.makedirs(os.path.dirname(path))
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    env = lmdb.open(path, subdir=False, map_size=1 << 24)
    keys = []
    with env.begin(write=True) as txn:
        for i, colour in enumerate(colours):
            buf = io.BytesIO()
            Image.new("RGB", (20, 10), colour).save(buf, format="JPEG", quality=100)
            key = f"img-{i}".encode()
            txn.put(key, pickle.dumps((buf.getvalue(), i)))
            keys.append(key)
        txn.put(b"__keys__", pickle.dumps(keys))
        txn.put(b"__len__", pickle.dumps(len(keys)))
    env.close()
    reader = LMDBReader(path)
    assert len(reader) == 3 and reader.keys == keys and reader.labels() == [0, 1, 2]
    dataset = ImageDataset("toy", "train", str(tmp_path), image_size=8)
    image, label = dataset[2]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 2
    assert image[2].float().mean() > 240 and image[0].float().mean() < 15  # blue, resized
    assert dataset.num_classes() == 3


def test_lmdb_records_with_classes_are_refused(tmp_path):
    import lmdb
    path = str(tmp_path / "evil.lmdb")
    env = lmdb.open(path, subdir=False, map_size=1 << 20)
    with env.begin(write=True) as txn:
        txn.put(b"__keys__", pickle.dumps([b"a"]))
        txn.put(b"__len__", pickle.dumps(1))
        txn.put(b"a", pickle.dumps((argparse.Namespace(x=1), 0)))
    env.close()
    with pytest.raises(pickle.UnpicklingError):
        LMDBReader(path)[0]


def test_digits_split_is_fixed(data_dir):
    train = ImageDataset("digits", "train", data_dir, 32)
    test = ImageDataset("digits", "test", data_dir, 32)
    assert (len(train), len(test)) == (1297, 500)
    assert sorted(set(train.reader.labels())) == list(range(10))
    image, _ = train[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[1])  # grey, replicated to RGB


def test_step_sampler_does_not_depend_on_the_number_of_processes():
    one = training.StepSampler(10, 4, seed=1, start_step=0, steps=7, rank=0, world=1)
    two = [training.StepSampler(10, 4, seed=1, start_step=0, steps=7, rank=r, world=2) for r in range(2)]
    for full, a, b in zip(one, *two):
        assert full == a + b
    resumed = training.StepSampler(10, 4, seed=1, start_step=3, steps=7, rank=0, world=1)
    assert list(resumed) == list(one)[3:]
    seen = [i for batch in training.StepSampler(10, 5, seed=1, start_step=0, steps=2, rank=0, world=1) for i in batch]
    assert sorted(seen) == list(range(10))  # one epoch covers every image once
