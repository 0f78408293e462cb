"""What the rest of the suite holds fixed, varied: every other test logs every step, decodes each split once, runs
one seed in fp32 with ImageNet's mean/std. Here: logging less often than every step (clipping and the non-finite
check still act at every step), the streamed data path (equal to the decoded one, across a resume too), two seeds
(the classifier head, dropout masks, flips and data order follow the seed), a θ₀ with its own mean/std (what the
model is fed, not what is recorded), and a results folder holding fp32 and bf16 runs of one cell."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import finetune
import pretrain
import report
import training
import utils
from data import ImageDataset, cache
from models import Preprocessing, load_mae, save_model

from helpers import Cut, TINY, cut_at, losses, nan_loss_at, spy, spy_prepare


def _weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def few(tmp_path_factory):
    """A data root with `few`: 21 training and 11 test images (random 12x12 pixels, 3 classes), so a batch of 8
    leaves a short last batch in both splits; small enough for whole fine-tuning runs with evaluation."""
    root = tmp_path_factory.mktemp("few")
    rng = np.random.default_rng(0)
    for split, n in (("train", 21), ("test", 11)):
        for k in range(n):
            folder = root / "few" / split / f"c{k % 3}"
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{k:02d}.png")
    return str(root)


# ----------------------------------------------------------------------------- logging less often than every step

def test_clipping_acts_at_every_step_when_logging_every_third(stage_args, tmp_path):
    def weights(name, *extra):
        pretrain.main(pretrain.get_args_parser().parse_args(
            stage_args("--output_dir", tmp_path / name, "--clip_grad", 0.01, *extra, steps=5)))
        return _weights(tmp_path / name)

    every = weights("every")  # TINY logs every step
    assert _same(every, weights("third", "--log_every", 3)), "the steps between logging steps were not clipped"
    assert not _same(every, weights("unclipped", "--clip_grad", 1e9)), "--clip_grad 0.01 clipped nothing"


def test_a_non_finite_loss_is_caught_at_a_save_that_is_not_a_logging_step(stage_args, tmp_path, monkeypatch):
    calls = nan_loss_at(monkeypatch, 3)
    argv = stage_args("--log_every", 5, "--save_every", 2, "--output_dir", tmp_path / "r", steps=8)
    with pytest.raises(utils.RunFailed, match="not finite at step 3 .*the last good state is .*train_state.pt"):
        pretrain.main(pretrain.get_args_parser().parse_args(argv))
    assert len(calls) == 4  # stopped at the save of step 4, before the logging step 5
    state = torch.load(tmp_path / "r" / training.STATE_FILE, weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())


# ----------------------------------------------------------------------------- the streamed data path

def _finetune_run(argv, finals=None):
    """finetune.main on argv; `finals` (a dict) gets the model's state as the evaluation starts."""
    args = finetune.get_args_parser().parse_args([str(a) for a in argv])
    if finals is None:
        return finetune.main(args)
    real = finetune.evaluate

    def evaluate(model, run, dataset):
        finals.setdefault("state", {k: v.clone() for k, v in model.state_dict().items()})
        return real(model, run, dataset)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(finetune, "evaluate", evaluate)
        finetune.main(args)


@pytest.mark.parametrize("streamed", ["data_cache_off", "split_over_memory"])
def test_streamed_runs_equal_the_decoded_run_and_resume_bit_identically(streamed, few, tmp_path, monkeypatch, capsys):
    """Fine-tuning (training batches and the evaluation of both splits) on the path that decodes each batch in
    the loader: `--data_cache off`, or a split larger than the memory budget. The whole run equals the run on the
    decode-once copy; a run cut after its save of step 2 and started again equals the whole run."""
    def argv(name, *extra):
        return [*TINY, "--dataset", "few", "--data_dir", few, "--scratch", "True", "--steps", 5, "--batch_size", 8,
                "--warmup_steps", 1, "--save_every", 2, "--output_dir", tmp_path / name, *extra]

    def result(name):
        with open(f"{tmp_path / name}.json") as f:
            r = json.load(f)
        return [r[k] for k in ("test_acc", "test_loss", "train_acc", "train_loss")]

    decoded = {}
    _finetune_run(argv("decoded"), decoded)
    extra = []
    if streamed == "data_cache_off":
        extra = ["--data_cache", "off"]
        monkeypatch.setattr(cache, "load_or_decode", lambda *a, **kw: pytest.fail("decoded with --data_cache off"))
    else:
        monkeypatch.setattr(cache, "available_ram", lambda: 1000)
    capsys.readouterr()
    whole, resumed = {}, {}
    _finetune_run(argv("whole", *extra), whole)
    if streamed == "split_over_memory":
        assert capsys.readouterr().out.count("streaming it through the workers") == 2  # train and test
    with training.supplied_draws(cut_at(stop=3)), pytest.raises(Cut):  # step 2's state on disk, step 3 lost
        _finetune_run(argv("resumed", *extra))
    assert torch.load(tmp_path / "resumed" / training.STATE_FILE, weights_only=True)["step"] == 2
    _finetune_run(argv("resumed", *extra), resumed)

    assert losses(tmp_path / "whole") == losses(tmp_path / "decoded") == losses(tmp_path / "resumed")
    assert _same(whole["state"], decoded["state"]) and _same(resumed["state"], whole["state"])
    assert result("whole") == result("decoded") == result("resumed")


# ----------------------------------------------------------------------------- two seeds

def test_the_seed_sets_the_head_the_dropout_masks_the_flips_and_the_data_order(few, tmp_path, monkeypatch):
    """Fine-tuning runs of seeds 1, 1 and 2, each cut before step 2: the new classifier head, the dropout masks,
    the flips and the images of each step are the same for the same seed, and all differ for another seed. The
    second run of seed 1 draws from the global generator just before the head is built: the head is seeded by
    --seed itself, not by what happened to draw before it."""
    def drawn(seed, name, disturb=False):
        masks, inputs = [], []
        with monkeypatch.context() as m:
            seen = spy_prepare(m)
            if disturb:
                spy(m, finetune, "train_val_split", lambda *a: torch.rand(1000))
            spy(m, finetune, "training_loss",
                lambda model, images, labels, flip: inputs.append((images.clone(), flip.clone())))

            def on_step(step):
                if step == 0:
                    for module in seen["model"].modules():
                        if isinstance(module, training.GlobalBatchDropout):
                            module.register_forward_hook(lambda mod, args, out: masks.append(out == 0))
            argv = [*TINY, "--dataset", "few", "--data_dir", few, "--scratch", "True", "--steps", 50,
                    "--batch_size", 8, "--seed", seed, "--output_dir", tmp_path / name]
            with training.supplied_draws(cut_at(stop=2, on_step=on_step)), pytest.raises(Cut):
                finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))
        assert len(masks) == 2 * 9  # 2 steps of 9 dropout layers
        # the head's weight: its bias starts at zero whatever the seed
        return {"head": [seen["start"]["classifier.weight"]], "dropout masks": masks,
                "flips": [torch.stack([f for _, f in inputs])],  # both steps' 16 at once: 8 may agree by chance
                "images": [i for i, _ in inputs]}

    one, again, two = drawn(1, "a"), drawn(1, "b", disturb=True), drawn(2, "c")
    for what in one:
        assert all(torch.equal(x, y) for x, y in zip(one[what], again[what], strict=True)), f"seed 1: other {what}"
        assert not any(torch.equal(x, y) for x, y in zip(one[what], two[what], strict=True)), \
            f"seeds 1 and 2: the same {what}"


# ----------------------------------------------------------------------------- the normalisation applied

MEAN, STD = (0.1, 0.7, 0.3), (0.9, 0.2, 0.5)  # far from ImageNet's, and different per channel


@pytest.fixture(scope="module")
def odd_theta0(tmp_path_factory):
    """vit-mae-tiny saved as a θ₀ folder whose preprocessor_config.json has unusual mean/std."""
    path = str(tmp_path_factory.mktemp("odd_theta0"))
    save_model(load_mae("vit-mae-tiny"), path, Preprocessing(mean=MEAN, std=STD))
    return path


def _expected(dataset, index) -> torch.Tensor:
    """(pixel / 255 - mean) / std of dataset's images `index`, with the θ₀ folder's mean/std."""
    pixels = torch.stack([dataset[i][0] for i in index]).float()
    return (pixels / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _fed(model, store: list):
    """Record what the model's patch embedding is fed: the pixel values every forward starts from."""
    return model.vit.embeddings.patch_embeddings.register_forward_pre_hook(
        lambda module, args: store.append(args[0].detach().clone()))


def test_training_feeds_the_model_pixels_normalised_with_its_own_mean_and_std(few, odd_theta0, tmp_path, monkeypatch):
    indices, fed = {}, []
    with monkeypatch.context() as m:
        seen = spy_prepare(m)

        class Recorded(training.Draws):
            """The run's own draws, recording each step's data order; hooks the model as the first step starts."""

            def indices(self, n, step):
                if not indices:
                    _fed(seen["model"], fed)
                indices[step] = super().indices(n, step)
                return indices[step]
        argv = [*TINY, "--dataset", "few", "--data_dir", few, "--model_name", odd_theta0, "--steps", 2,
                "--batch_size", 8, "--output_dir", tmp_path / "run"]
        with training.supplied_draws(lambda args, rank, world, device: Recorded(args.seed, args.batch_size,
                                                                                args.steps, rank, world, device)):
            pretrain.main(pretrain.get_args_parser().parse_args([str(a) for a in argv]))
    dataset = ImageDataset("few", "train", few, 32)
    assert len(fed) == 2 == len(indices)
    for step, images in enumerate(fed):
        torch.testing.assert_close(images, _expected(dataset, indices[step]), rtol=1e-6, atol=1e-6,
                                   msg=f"step {step}: not (pixel/255 - mean)/std with θ₀'s mean/std")


def test_evaluation_feeds_the_model_pixels_normalised_with_its_own_mean_and_std(few, odd_theta0, tmp_path,
                                                                                monkeypatch):
    fed = {}
    real = finetune.evaluate

    def evaluate(model, run, dataset):
        fed[len(dataset)] = []
        hook = _fed(model, fed[len(dataset)])
        try:
            return real(model, run, dataset)
        finally:
            hook.remove()
    monkeypatch.setattr(finetune, "evaluate", evaluate)
    argv = [*TINY, "--dataset", "few", "--data_dir", few, "--model_name", odd_theta0, "--scratch", "True",
            "--steps", 1, "--batch_size", 8, "--output_dir", tmp_path / "run"]
    finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))
    for split, n in (("test", 11), ("train", 21)):
        torch.testing.assert_close(torch.cat(fed[n]), _expected(ImageDataset("few", split, few, 32), range(n)),
                                   rtol=1e-6, atol=1e-6, msg=f"{split} split: not normalised with θ₀'s mean/std")


# ----------------------------------------------------------------------------- precisions in one results folder

def test_report_keeps_fp32_and_bf16_runs_of_one_cell_apart(few, tmp_path, capsys):
    """Real fine-tuning results, seed 1 in fp32 and seed 2 in bf16 (the same arguments otherwise: --precision does
    not count as a setting, the precision the run used does), each copied as one more seed of its precision with
    another accuracy. The cell is `mixed settings`, each precision its own group and CSV row, never one mean."""
    res = tmp_path / "res"
    for seed, precision in ((1, "fp32"), (2, "bf16")):
        argv = [*TINY, "--dataset", "few", "--data_dir", few, "--scratch", "True", "--steps", 1, "--batch_size", 8,
                "--seed", seed, "--precision", precision, "--results_dir", res]
        finetune.main(finetune.get_args_parser().parse_args([str(a) for a in argv]))
    cell = res / "few" / "initial"
    for seed, copy, acc in ((1, 3, 0.25), (2, 4, 0.75)):
        with open(cell / f"seed{seed}.json") as f:
            r = json.load(f)
        assert r["history"][-1]["precision"] == ("fp32" if seed == 1 else "bf16")
        r.update(test_acc=acc, seed=copy, args={**r["args"], "seed": copy})
        with open(cell / f"seed{copy}.json", "w") as f:
            json.dump(r, f)
    acc = {s: 100 * json.load(open(cell / f"seed{s}.json"))["test_acc"] for s in (1, 2, 3, 4)}

    capsys.readouterr()  # the runs' own lines
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    table = capsys.readouterr().out
    assert "| Fine-tuning (initial model) | mixed settings [1] |" in table, table
    note = next(line for line in table.splitlines() if line.startswith("[1] few"))
    assert "precision=fp32: " in note and "seeds 1 3" in note and "precision=bf16: " in note and "seeds 2 4" in note
    with open(res / "report.csv") as f:
        rows = [line.split(",") for line in f.read().splitlines()[1:]]
    assert [(r[3], r[12]) for r in rows] == [("2", "precision=fp32"), ("2", "precision=bf16")], rows
    assert [float(r[4]) for r in rows] == pytest.approx([(acc[1] + acc[3]) / 2, (acc[2] + acc[4]) / 2], abs=1e-4)
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res), "--init", "initial"]))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and "(precision=fp32)" in lines[0] and "(precision=bf16)" in lines[1], lines
