"""finetune.py --recipe mae (training/mae_recipe.py): each piece equals timm's own function on the same inputs and
random draws; its draws are functions of (seed, step, global row), so two processes' halves equal one process's
batch; the flags resolve as documented; and report.py never averages another recipe's runs with the paper's."""
import json
import os
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.layers import drop_path
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay
from timm.scheduler import CosineLRScheduler

import finetune
import report
import utils
from helpers import TINY
from helpers import spy, spy_prepare
from models import build_classifier, load_mae
from models.hub import TINY_CONFIG
from models.vit_mae import DropPathGlobalBatch
from training import adamw, mae_recipe

NUM_CLASSES = 5
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def tiny_classifier(drop_path_rate=0.0, dropout=0.0):
    mae = load_mae("vit-mae-tiny")
    torch.manual_seed(0)  # the new head
    return build_classifier(mae.config, mae.vit.state_dict(), NUM_CLASSES, dropout, drop_path_rate)


def recipe_args(*argv):
    args = finetune.get_args_parser().parse_args(["--dataset", "digits", *argv])
    mae_recipe.resolve_recipe(args)
    return args


def normalised_batch(b=6, size=32, seed=0):
    pixels = torch.randint(0, 256, (b, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return pixels, (pixels.float() / 255 - MEAN) / STD


# ----------------------------------------------------------------------------- layer decay and weight decay

def timm_name(hf: str) -> str:
    """The timm VisionTransformer parameter that a transformers ViT parameter corresponds to."""
    fixed = {"vit.embeddings.cls_token": "cls_token", "vit.embeddings.position_embeddings": "pos_embed",
             "vit.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
             "vit.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
             "vit.layernorm.weight": "norm.weight", "vit.layernorm.bias": "norm.bias",
             "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
    if hf in fixed:
        return fixed[hf]
    _, _, block, rest = hf.split(".", 3)
    for ours, theirs in (("attention.q_proj", "attn.qkv"), ("attention.k_proj", "attn.qkv"),
                         ("attention.v_proj", "attn.qkv"), ("attention.o_proj", "attn.proj"),
                         ("layernorm_before", "norm1"), ("layernorm_after", "norm2"), ("mlp.fc", "mlp.fc")):
        if rest.startswith(ours):
            return f"blocks.{block}.{theirs}{rest[len(ours):]}"
    raise KeyError(hf)


def test_layer_decay_groups_match_timm_param_groups_layer_decay():
    """The MAE recipe's groups on the transformers ViT: per parameter the lr scale and weight decay that timm's
    param_groups_layer_decay gives the corresponding parameter of a timm ViT of the same depth (MAE's no-decay list:
    the model's no_weight_decay(), plus every 1-D tensor)."""
    model = tiny_classifier()
    lr, wd, decay = 1e-3, 0.05, 0.65
    ours = {id(p): g for g in mae_recipe.layer_decay_groups(model, lr, wd, mae_recipe.mae_no_weight_decay, decay)
            for p in g["params"]}
    c = TINY_CONFIG
    timm_vit = VisionTransformer(img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["hidden_size"],
                                 depth=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                                 mlp_ratio=c["intermediate_size"] / c["hidden_size"], num_classes=NUM_CLASSES)
    theirs = {}
    for g in param_groups_layer_decay(timm_vit, wd, timm_vit.no_weight_decay(), layer_decay=decay):
        for p in g["params"]:
            theirs[p] = (g["lr_scale"], g["weight_decay"])
    timm_params = dict(timm_vit.named_parameters())
    covered = set()
    for name, param in model.named_parameters():
        group, other = ours[id(param)], timm_name(name)
        covered.add(other)
        scale, their_wd = theirs[timm_params[other]]
        assert group["lr_scale"] == pytest.approx(scale, rel=1e-12), name
        assert group["lr"] == pytest.approx(lr * scale, rel=1e-12), name
        assert group["weight_decay"] == their_wd, name
    assert covered == set(timm_params)
    assert sorted({g["lr_scale"] for g in ours.values()}) == pytest.approx([decay ** k for k in range(6)][::-1])


def test_static_adamw_gives_each_layer_its_own_rate_as_a_tensor():
    """--cuda_graph: each group's rate becomes a tensor (a captured graph reads the current one); the update
    equals the eager optimizer's."""
    steps = []
    for static in (False, True):
        model = tiny_classifier()
        groups = mae_recipe.layer_decay_groups(model, 1e-2, 0.05, mae_recipe.mae_no_weight_decay, 0.65)
        optimizer = adamw(groups, 1e-2, (0.9, 0.999), torch.device("cpu"), static=static)
        schedule = mae_recipe.cosine_schedule(optimizer, 1, 4)
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        for _ in range(3):
            model(x).logits.square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
        steps.append([p.detach().clone() for p in model.parameters()])
        if static:
            assert all(torch.is_tensor(g["lr"]) for g in optimizer.param_groups)
    for eager, graphed in zip(*steps):
        torch.testing.assert_close(eager, graphed, rtol=0, atol=1e-7)


def test_cosine_schedule_matches_timm_cosine_scheduler():
    warmup, total, lr = 5, 45, 2e-3
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    factor = mae_recipe.cosine_schedule(optimizer, warmup, total).lr_lambdas[0]
    timm_schedule = CosineLRScheduler(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr),
                                      t_initial=total - warmup, lr_min=0.0, warmup_t=warmup, warmup_lr_init=0.0,
                                      warmup_prefix=True)
    for step in range(total + 3):
        assert lr * factor(step) == pytest.approx(timm_schedule._get_lr(step)[0], abs=1e-15), step
    assert factor(warmup) == 1.0 and factor(total) == 0.0
    assert factor(warmup + (total - warmup) // 2) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- drop path

def test_drop_path_zero_is_the_plain_classifier_bit_for_bit():
    plain, zero = tiny_classifier(dropout=0.1), tiny_classifier(0.0, dropout=0.1)
    plain.train(), zero.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    a = plain(x).logits
    torch.manual_seed(3)
    b = zero(x).logits
    assert torch.equal(a, b)
    assert not any(isinstance(m, DropPathGlobalBatch) for m in zero.modules())


def test_drop_path_follows_timm_drop_path_on_the_same_draws_and_rises_with_depth():
    x = torch.randn(8, 5, 16, generator=torch.Generator().manual_seed(0))
    module = DropPathGlobalBatch(0.4, 0, 1).train()
    torch.manual_seed(7)
    ours = module(x)
    torch.manual_seed(7)
    assert torch.equal(ours, drop_path(x, 0.4, training=True))
    assert 0 < (ours.flatten(1) == 0).all(1).sum() < 8  # whole samples dropped, not all
    # two processes: each its rows of the one-process draws
    halves = []
    for rank in range(2):
        torch.manual_seed(7)
        halves.append(DropPathGlobalBatch(0.4, rank, 2).train()(x[rank * 4:(rank + 1) * 4]))
    assert torch.equal(torch.cat(halves), ours)
    model = tiny_classifier(0.1)
    rates = [m.p for m in model.modules() if isinstance(m, DropPathGlobalBatch)]
    assert rates == pytest.approx(torch.linspace(0, 0.1, TINY_CONFIG["num_hidden_layers"]).tolist())
    model.eval()
    plain = tiny_classifier().eval()
    assert torch.equal(model(x[:2, :3].new_ones(2, 3, 32, 32)).logits, plain(x.new_ones(2, 3, 32, 32)).logits)


# ----------------------------------------------------------------------------- mixup / cutmix, erasing, RandAugment

def augment_of(*argv, rank=0):
    args = recipe_args(*argv)
    return mae_recipe.Augment(mae_recipe.Pieces.from_flags(vars(args)), args.seed, MEAN, STD, rank, NUM_CLASSES, 32)


@pytest.mark.parametrize("flags", [("--mixup", "0.8"), ("--cutmix", "1.0"), ("--mixup", "0.8", "--cutmix", "1.0")])
def test_mixup_cutmix_is_timm_mixup_on_each_pair_with_the_steps_draws(flags):
    """Rows 2k, 2k+1 come out as timm's Mixup (mode 'batch', the recipe's smoothing) makes them from that pair
    alone, numpy seeded from (seed, MIX, step): one λ and box per step for every pair."""
    _, images = normalised_batch(6)
    labels = torch.tensor([0, 1, 2, 3, 4, 0])
    augment = augment_of(*flags, "--label_smoothing", "0.1", "--seed", "3")
    for step in (0, 5):
        mixed, targets = augment(step, images, labels)
        timm_mixup = Mixup(mixup_alpha=augment.mixup.mixup_alpha, cutmix_alpha=augment.mixup.cutmix_alpha,
                           label_smoothing=0.1, num_classes=NUM_CLASSES)
        for k in range(0, 6, 2):
            np.random.seed(utils.mix_seed(3, utils.STREAM_MIX, step) % 2**32)
            pair, pair_targets = timm_mixup(images[k:k + 2].clone(), labels[k:k + 2])
            assert torch.equal(mixed[k:k + 2], pair), (step, k)
            assert torch.equal(targets[k:k + 2], pair_targets), (step, k)
        assert not torch.equal(mixed, images)


def test_mixup_erasing_randaug_draws_do_not_depend_on_the_number_of_processes():
    argv = ("--recipe", "mae", "--seed", "1")
    _, images = normalised_batch(8)
    labels = torch.arange(8) % NUM_CLASSES
    whole_images, whole_targets = augment_of(*argv)(4, images, labels)
    halves = [augment_of(*argv, rank=r)(4, images[r * 4:(r + 1) * 4], labels[r * 4:(r + 1) * 4]) for r in range(2)]
    assert torch.equal(torch.cat([h[0] for h in halves]), whole_images)
    assert torch.equal(torch.cat([h[1] for h in halves]), whole_targets)
    again = augment_of(*argv)(4, images, labels)  # the same step again (a resumed run): the same batch
    assert torch.equal(again[0], whole_images)
    assert not torch.equal(augment_of(*argv)(5, images, labels)[0], whole_images)


def test_random_erasing_is_timm_random_erasing_per_image_with_its_draws():
    _, images = normalised_batch(6)
    augment = augment_of("--reprob", "0.5", "--seed", "2", rank=1)  # rows 6..11 of the global batch
    erased, targets = augment(9, images, torch.zeros(6, dtype=torch.long))
    timm_erase = RandomErasing(0.5, mode="pixel", max_count=1, device="cpu")
    for row in range(6):
        seed = utils.mix_seed(2, utils.STREAM_ERASE, 9, 6 + row)
        random.seed(seed), torch.manual_seed(seed)
        expected = timm_erase(images[row].clone())
        assert torch.equal(erased[row], expected), row
    assert 0 < sum(not torch.equal(erased[r], images[r]) for r in range(6)) < 6


def test_randaugment_is_timms_per_image_on_the_uint8_pixels_with_its_draws():
    pixels, images = normalised_batch(4)
    augment = augment_of("--randaug", "rand-m9-mstd0.5-inc1", "--seed", "5")
    assert torch.equal(augment.to_uint8(images), pixels)  # the pixels the batch was normalised from, exactly
    state = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    out, _ = augment(2, images, torch.zeros(4, dtype=torch.long))
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    assert torch.equal(torch.get_rng_state(), state[2])  # the caller's generators are left as they were
    timm_randaug = mae_recipe.randaug_transform("rand-m9-mstd0.5-inc1", 32, MEAN.flatten().tolist())
    assert timm_randaug.ops[0].hparams["translate_const"] == int(32 * 0.45)  # create_transform's hparams
    for row in range(4):
        seed = utils.mix_seed(5, utils.STREAM_RANDAUG, 2, row)
        random.seed(seed), np.random.seed(seed % 2**32), torch.manual_seed(seed)
        expected = np.asarray(timm_randaug(Image.fromarray(pixels[row].permute(1, 2, 0).numpy())))
        expected = (torch.from_numpy(expected).permute(2, 0, 1)[None].float() / 255 - MEAN) / STD
        assert torch.equal(out[row:row + 1], expected), row
    assert not torch.equal(out, images)


def test_the_loss_is_timms_for_each_piece():
    """Cross-entropy on the labels (the paper's); with smoothing alone timm's smoothed one-hot targets, whose
    soft-target loss is timm's LabelSmoothingCrossEntropy (MAE's loss without mixup); with mixup
    SoftTargetCrossEntropy on the mixed targets."""
    logits = torch.randn(4, NUM_CLASSES, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3])
    _, images = normalised_batch(4)
    model = lambda x: type("Out", (), {"logits": logits})()  # noqa: E731  (the logits whatever the images)
    no_flip = torch.zeros(4, dtype=torch.bool)
    assert augment_of()(0, images, labels)[1] is labels
    assert torch.equal(finetune.training_loss(model, images, labels, no_flip)[0], F.cross_entropy(logits, labels))
    _, smoothed = augment_of("--label_smoothing", "0.1")(0, images, labels)
    torch.testing.assert_close(finetune.training_loss(model, images, smoothed, no_flip)[0],
                               LabelSmoothingCrossEntropy(0.1)(logits, labels), rtol=1e-6, atol=0)
    _, mixed = augment_of("--recipe", "mae")(0, images, labels)
    assert torch.equal(finetune.training_loss(model, images, mixed, no_flip)[0],
                       SoftTargetCrossEntropy()(logits, mixed))


# ----------------------------------------------------------------------------- flags

def test_recipe_mae_sets_the_pieces_and_a_given_flag_wins():
    release = recipe_args()
    assert {k: getattr(release, k) for k in mae_recipe.RECIPES["release"]} == mae_recipe.RECIPES["release"]
    mae = recipe_args("--recipe", "mae")
    assert {k: getattr(mae, k) for k in mae_recipe.RECIPES["mae"]} == dict(
        layer_decay=0.65, drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, reprob=0.25,
        randaug="rand-m9-mstd0.5-inc1", schedule="cosine", weight_decay=0.05)
    mixed = recipe_args("--recipe", "mae", "--layer_decay", "0.75", "--mixup", "0", "--weight_decay", "0.01",
                        "--schedule", "linear")
    assert (mixed.layer_decay, mixed.mixup, mixed.weight_decay, mixed.schedule, mixed.cutmix) == (
        0.75, 0.0, 0.01, "linear", 1.0)
    one = recipe_args("--reprob", "0.25")  # a piece on its own, the rest the paper's
    assert (one.reprob, one.layer_decay, one.schedule) == (0.25, 1.0, "linear")
    assert all(type(getattr(mae, k)) in (float, str) for k in mae_recipe.RECIPES["mae"])  # plain, as recorded
    with pytest.raises(utils.UserError, match="--randaug 'bogus' is not a timm rand-augment string"):
        recipe_args("--randaug", "bogus")


def test_odd_per_process_batch_with_mixup_is_refused():
    def check(local_batch, *argv):
        args = recipe_args(*argv)
        mae_recipe.check_mix_batch(mae_recipe.Pieces.from_flags(vars(args)), args.batch_size, local_batch,
                                   args.accum_steps)
    check(8, "--recipe", "mae")
    check(7)
    with pytest.raises(utils.UserError, match="even number"):
        check(7, "--cutmix", "1.0")


# ----------------------------------------------------------------------------- the results table

def test_main_runs_the_mae_recipe_and_it_is_another_row_in_the_report(data_dir, tmp_path, monkeypatch):
    """finetune.main --recipe mae trains with every piece: layer-decay groups, the cosine schedule, drop path, the
    augmented batch and its soft targets reach the loss. Its result lands in <init>/recipe-mae/: its own row, never
    averaged with the release's runs; a piece given under the release's recipe shows as mixed settings; a record
    from before these flags averages with a release run of today. (One real run; the others are its record with
    the arguments they would have.)"""
    results = str(tmp_path / "results")
    seen, losses = spy_prepare(monkeypatch), []
    spy(monkeypatch, finetune, "training_loss", lambda model, images, labels, flip: losses.append((images, labels)))
    finetune.main(finetune.get_args_parser().parse_args(
        [*TINY, "--dataset", "digits", "--data_dir", data_dir, "--results_dir", results, "--scratch", "True",
         "--steps", "1", "--batch_size", "4", "--seed", "1", "--recipe", "mae", "--warmup_steps", "2"]))
    scales = sorted({g["lr_scale"] for g in seen["optimizer"].param_groups})
    assert scales == pytest.approx([0.65 ** k for k in range(TINY_CONFIG["num_hidden_layers"] + 2)][::-1])
    assert seen["scheduler"].lr_lambdas[0].__qualname__.startswith("cosine_schedule")
    assert any(isinstance(m, DropPathGlobalBatch) for m in seen["model"].modules())
    (images, labels), = losses
    assert labels.shape == (4, 10) and labels.is_floating_point()  # mixed, smoothed
    with open(os.path.join(results, "digits", "initial", "recipe-mae", "seed1.json")) as f:
        mae_run = json.load(f)

    def write(seed, folder="initial", drop=(), **args):
        result = {**mae_run, "seed": seed, "args": {**mae_run["args"], **mae_recipe.RECIPES["release"],
                                                     "recipe": "release", "seed": seed, **args}}
        for key in drop:
            del result["args"][key]
        if drop:  # as written before the flags: a record of the version before the schema's
            del result["schema_version"]
        os.makedirs(os.path.join(results, "digits", folder), exist_ok=True)
        with open(os.path.join(results, "digits", folder, f"seed{seed}.json"), "w") as f:
            json.dump(result, f)
    write(0)
    write(2, "initial/recipe-mae", **{**mae_recipe.RECIPES["mae"], "recipe": "mae"})
    write(3, drop=["recipe", *(k for k in mae_recipe.RECIPES["release"] if k != "weight_decay")])  # before the flags
    summaries = report.summarize(results)
    assert set(summaries) == {("digits", "initial"), ("digits", "initial/recipe-mae")}
    assert summaries[("digits", "initial")]["n"] == 2 and summaries[("digits", "initial/recipe-mae")]["n"] == 2
    assert all(not s["groups"] for s in summaries.values())
    write(4, mixup=0.8)  # a piece under the release's recipe: the same folder, so the cell says mixed
    groups = report.summarize(results)[("digits", "initial")]["groups"]
    assert [(g["settings"], g["n"]) for g in groups] == [({"mixup": 0.0}, 2), ({"mixup": 0.8}, 1)]
