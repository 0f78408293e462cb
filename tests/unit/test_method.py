"""The method's pieces on fixed inputs, without a run: the MAE loss against transformers' own and the formula, the
distillation feature and loss, one backward for both losses, fine-tuning's weight-decay groups, the learning-rate
schedule, the release's LMDB layout, the fixed digits split, the step sampler. (The three stages end to end:
tests/test_pipeline.py.)"""
import argparse
import io
import os
import pickle

import pytest
import torch
from PIL import Image
from transformers import ViTConfig, ViTMAEForPreTraining, ViTModel

import finetune
import mae_common
import selftrain
import training
from data import ImageDataset, LMDBReader
from models import build_classifier, cls_feature, load_mae, mae_loss, save_model


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
