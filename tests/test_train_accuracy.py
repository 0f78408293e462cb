"""The training-set accuracy and loss finetune.py records (eval mode, after the last step, on the images it trained
on, without the --val_split part), checked against an independent evaluation of the saved classifier; and how
report.py --train shows them."""
import csv
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import ViTForImageClassification

import finetune
import report
from data import LMDBReader, decode_image

from helpers import result_file


def _classify(model_dir: str, records: list) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the saved classifier on (image bytes, label) records, computed from the
    files alone: the stored preprocessing, stock from_pretrained, eval mode, no flip."""
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        pre = json.load(f)
    model = ViTForImageClassification.from_pretrained(model_dir).eval()
    size = model.config.image_size
    images = torch.stack([decode_image(image, size, pre["resample"]) for image, _ in records]).float() / 255
    images = (images - torch.tensor(pre["image_mean"])[:, None, None]) / torch.tensor(pre["image_std"])[:, None, None]
    labels = torch.tensor([label for _, label in records])
    with torch.no_grad():
        logits = model(images).logits
    return (logits.argmax(-1) == labels).sum().item() / len(labels), F.cross_entropy(logits, labels).item()


def test_recorded_training_accuracy_is_the_saved_classifiers_on_the_images_trained_on(stage_args, data_dir,
                                                                                     tmp_path):
    results = tmp_path / "results"
    argv = stage_args("--scratch", "True", "--results_dir", results, "--val_split", 0.25, "--save_model",
                      "--lr", 3e-3, "--warmup_steps", 6, batch_size=32, steps=60)
    finetune.main(finetune.get_args_parser().parse_args(argv))
    result = json.loads((results / "digits" / "initial" / "seed0.json").read_text())

    train = LMDBReader(os.path.join(data_dir, "digits", "train.lmdb"))
    trained_on, held_out = finetune.train_val_split(len(train), 0.25)
    assert result["num_train"] == len(trained_on) == len(train) - result["num_val"]
    acc, loss = _classify(result["model"], [train[i] for i in trained_on])
    assert result["train_acc"] == pytest.approx(acc, abs=1e-9)
    assert result["train_loss"] == pytest.approx(loss, rel=1e-4)
    # the numbers tell the parts apart: they are not those of the whole training split or the held-out part
    assert 0.2 < acc < 1.0
    whole = _classify(result["model"], [train[i] for i in range(len(train))])
    assert result["train_loss"] != pytest.approx(whole[1], rel=1e-4)
    assert result["val_loss"] == pytest.approx(_classify(result["model"], [train[i] for i in held_out])[1], rel=1e-4)


def _run(*argv):
    report.main(report.get_args_parser().parse_args([str(a) for a in argv]))


def test_report_shows_training_accuracy_only_with_train(tmp_path, capsys):
    results = tmp_path / "results"
    train = {"initial": [0.90, 1.00, 0.96], "self-further-pretrain-20000": [0.99, 0.97, 1.00]}
    for init, accs in train.items():
        for seed, acc in enumerate(accs, start=1):
            result_file(results, "cub", init, seed, 0.5 + 0.1 * seed, train_acc=acc, train_loss=1.0 - acc)
    result_file(results, "cub", "further-pretrain-20000", 1, 0.7)  # a result written before train_acc existed

    _run("--results_dir", results)
    plain = capsys.readouterr().out
    assert "Training accuracy" not in plain
    with open(results / "report.csv") as f:
        assert "mean_train_acc" not in f.readline()

    _run("--results_dir", results, "--train")
    text = capsys.readouterr().out
    section = text.split("## Training accuracy (%)")[1].split("\n\n")[1]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in section.splitlines()[2:]}
    mean, std = np.mean([90, 100, 96]), np.std([90, 100, 96], ddof=1)
    assert rows["Fine-tuning (initial model)"] == f"{mean:.2f} ± {std:.2f} (n=3)"
    assert rows["Further pre-training (20000)"] == "—"
    assert "**" not in section  # the best fit is no result to mark
    with open(results / "report.csv") as f:
        by_init = {r["init"]: r for r in csv.DictReader(f)}
    assert float(by_init["initial"]["mean_train_acc"]) == pytest.approx(mean, abs=1e-4)
    assert float(by_init["initial"]["mean_train_loss"]) == pytest.approx(np.mean([0.10, 0.0, 0.04]), abs=1e-4)
    assert by_init["initial"]["n_train"] == "3" and by_init["further-pretrain-20000"]["n_train"] == ""

    _run("--results_dir", results, "--init", "initial", "--train")
    assert capsys.readouterr().out.strip().endswith(f"; training accuracy {mean:.2f} ± {std:.2f} % (lowest 90.00, n=3)")


def test_report_refuses_a_training_accuracy_that_is_no_fraction(tmp_path):
    result_file(tmp_path, "cub", "initial", 1, 0.5, train_acc=97.0, train_loss=0.1)
    with pytest.raises(report.utils.UserError, match="train_acc is 97.0"):
        _run("--results_dir", tmp_path)
