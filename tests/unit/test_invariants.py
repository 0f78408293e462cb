"""What the recipe depends on, pinned so that an upgrade of transformers that changes it fails here, loudly.

transformers 5 silently changed two of these (docs/fidelity.md): `from_pretrained`
returned MAE's fixed sin-cos position tables trainable, and a model built from a config had all-zero tables and
tokens. Each test
names the invariant it guards; the numbers come from the release on transformers 4.17 (tests/golden/).
"""
import io
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTMAEForPreTraining

import finetune
import mae_common
import pretrain
import training
import utils
from models import (SINCOS_TABLES, TINY_NAME, MAEWithFeature, Preprocessing, build_classifier, cls_feature, load_mae,
                    mae_loss, preprocessing_of, save_model, sincos_2d_table)
from models.hub import TINY_CONFIG

from helpers import GOLDEN, group_names, release_groups


def frozen(model) -> list[str]:
    return sorted(n for n, p in model.named_parameters() if not p.requires_grad)


def test_tiny_config_is_the_golden_architecture(golden):
    """The golden numbers stand for vit-mae-tiny only while the two architectures agree."""
    config = golden[0]["config"]
    assert {k: config[k] for k in TINY_CONFIG} == TINY_CONFIG


# ----------------------------------------------------------------------------- frozen: the sin-cos tables only

def test_only_the_sincos_tables_are_frozen_in_every_mae_load(theta0_dir, tmp_path):
    tiny = load_mae(TINY_NAME)
    assert frozen(tiny) == sorted(SINCOS_TABLES)
    assert frozen(load_mae(theta0_dir)) == sorted(SINCOS_TABLES)  # from_pretrained of a directory
    save_model(tiny, str(tmp_path / "saved"))
    assert frozen(load_mae(str(tmp_path / "saved"))) == sorted(SINCOS_TABLES)  # and of our own checkpoints
    assert frozen(MAEWithFeature(load_mae(TINY_NAME))) == sorted("mae." + n for n in SINCOS_TABLES)


def test_frozen_tables_stay_out_of_the_optimizer():
    mae = load_mae(TINY_NAME)
    in_groups = {id(p) for g in training.param_groups(mae, 0.01, mae_common.no_weight_decay) for p in g["params"]}
    assert all((id(p) in in_groups) == p.requires_grad for p in mae.parameters())
    assert not any(id(mae.get_parameter(n)) in in_groups for n in SINCOS_TABLES)


def test_finetuning_trains_the_position_table_without_weight_decay():
    """The release's fine-tuning: nothing frozen, and names with position_embeddings get no weight decay."""
    mae = load_mae(TINY_NAME)
    model = build_classifier(mae.config, mae.vit.state_dict(), 10, 0.1)
    assert frozen(model) == []
    decay, no_decay = training.param_groups(model, 0.01, finetune.no_weight_decay)
    assert any(p is model.vit.embeddings.position_embeddings for p in no_decay["params"])
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0


def test_pretraining_from_a_model_directory_keeps_the_tables_bit_identical(stage_args, tmp_path):
    theta0 = str(tmp_path / "theta0")
    save_model(load_mae(TINY_NAME), theta0)
    before = ViTMAEForPreTraining.from_pretrained(theta0).state_dict()
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--model_name", theta0, steps=3)))
    after = ViTMAEForPreTraining.from_pretrained(str(tmp_path / "ckpt" / "further-pretrain-3" / "digits")).state_dict()
    for name in SINCOS_TABLES:
        assert torch.equal(after[name], before[name]), name
    assert not torch.equal(after["vit.layers.0.mlp.fc1.weight"], before["vit.layers.0.mlp.fc1.weight"])  # it trained


# ----------------------------------------------------------------------------- values: tables and initialisation

def test_sincos_tables_equal_the_release_and_the_formula(golden):
    theta0 = load_file(os.path.join(GOLDEN, "theta0.safetensors"))  # transformers 4.17's tables
    assert torch.equal(sincos_2d_table(64, 8), theta0["vit.embeddings.position_embeddings"])
    assert torch.equal(sincos_2d_table(32, 8), theta0["decoder.decoder_pos_embed"])
    table = sincos_2d_table(64, 8)[0]
    assert torch.equal(table[0], torch.zeros(64))  # CLS row
    # patch (row 2, column 5) = token 1 + 2·8 + 5: column in the first half of the channels, row in the second
    omega = [1 / 10000 ** (i / 16) for i in range(16)]
    expected = ([math.sin(5 * w) for w in omega] + [math.cos(5 * w) for w in omega]
                + [math.sin(2 * w) for w in omega] + [math.cos(2 * w) for w in omega])
    torch.testing.assert_close(table[1 + 2 * 8 + 5], torch.tensor(expected), rtol=0, atol=1e-6)


def test_vit_mae_tiny_has_mae_initialisation():
    mae = load_mae(TINY_NAME)
    assert torch.equal(mae.vit.embeddings.position_embeddings, sincos_2d_table(64, 8))
    assert torch.equal(mae.decoder.decoder_pos_embed, sincos_2d_table(32, 8))
    for token in (mae.vit.embeddings.cls_token, mae.decoder.mask_token):
        assert 0.015 < token.std().item() < 0.025 and abs(token.mean().item()) < 0.01
    w = mae.vit.embeddings.patch_embeddings.projection.weight.flatten(1)  # Xavier-uniform on (D, C·p·p)
    bound = math.sqrt(6 / sum(w.shape))
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    for module in mae.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.abs().max() <= math.sqrt(6 / sum(module.weight.shape))
            assert not module.bias.any()
        if isinstance(module, torch.nn.LayerNorm):
            assert module.weight.eq(1).all() and not module.bias.any()
    assert torch.equal(load_mae(TINY_NAME).state_dict()["vit.embeddings.cls_token"], mae.vit.embeddings.cls_token)


def test_masked_patches_get_position_dependent_predictions():
    """With the tables zero (transformers 5's fresh model), every masked patch of an image got the same
    prediction; with MAE's tables, they differ."""
    mae = load_mae(TINY_NAME).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = mae(x, noise=noise)
    masked = out.logits[0][out.mask[0].bool()]  # (48, 48) predictions of image 0's hidden patches
    assert (masked - masked[0]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- the recipe's numbers

def test_weight_decay_groups_by_name(golden):
    """Which names the two optimizers decay, against the release's lists (4.17 names mapped)."""
    mae = load_mae(TINY_NAME)
    assert group_names(mae, mae_common.no_weight_decay) == release_groups(golden[0]["pretrain"])
    model = build_classifier(mae.config, mae.vit.state_dict(), 10, 0.1)
    assert group_names(model, finetune.no_weight_decay) == release_groups(golden[0]["finetune"])


def test_mae_loss_masking_and_cls_feature_on_a_fixed_input(golden, theta0_dir):
    expected, batch, release = golden
    mae = load_mae(theta0_dir).eval()
    x, noise = batch["pixel_values"], batch["noise"][0]
    with torch.no_grad():
        out = mae(x, noise=noise)
        loss = mae_loss(mae, x, noise)
        feature = cls_feature(mae.vit, x)
    assert torch.equal(out.mask, batch["mask"][0])  # the 16 patches with the smallest noise stay visible
    assert loss.item() == pytest.approx(expected["pretrain"]["loss"][0], rel=1e-5)
    torch.testing.assert_close(feature, release["selftrain/student_cls"][0], rtol=1e-5, atol=1e-5)


def test_preprocessing_follows_the_initial_models_processor_file(stage_args, data_dir, tmp_path):
    """The release resized with θ₀'s image processor: its filter, mean and std are used, recorded in
    args.json and written into the checkpoint's own processor file; without a file, bilinear."""
    import numpy as np
    from PIL import Image

    from data import ImageDataset
    theta0 = str(tmp_path / "theta0")
    save_model(load_mae(TINY_NAME), theta0, Preprocessing(resample=3, mean=(0.5,) * 3, std=(0.25,) * 3))
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args("--model_name", theta0, steps=2)))
    out = tmp_path / "ckpt" / "further-pretrain-2" / "digits"
    with open(out / "args.json") as f:
        recorded = json.load(f)["preprocessing"]
    assert (recorded["resample"], recorded["mean"], recorded["std"]) == (3, [0.5] * 3, [0.25] * 3)
    with open(out / "preprocessor_config.json") as f:
        written = json.load(f)
    assert (written["resample"], written["image_mean"], written["size"]) == (3, [0.5] * 3, {"height": 32, "width": 32})
    assert preprocessing_of(TINY_NAME).resample == 2  # no file: transformers 4.17's default, bilinear
    bicubic = ImageDataset("digits", "train", data_dir, 32, resample=3)
    image_bytes, _ = bicubic.reader[0]
    with Image.open(io.BytesIO(image_bytes)) as img:
        expected = np.array(img.convert("RGB").resize((32, 32), Image.BICUBIC))
    assert torch.equal(bicubic[0][0], torch.from_numpy(expected).permute(2, 0, 1))
    assert not torch.equal(bicubic[0][0], ImageDataset("digits", "train", data_dir, 32)[0][0])
