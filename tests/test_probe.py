"""probe.py: the weighted k-NN on features whose answer is known, the features are the encoder's unmasked CLS,
the linear probe end to end from θ₀ and from a further pre-trained checkpoint (records, seeds), the k-NN run's
record, and report.py's probe tables."""
import json
import math

import pytest
import torch

import pretrain
import probe
import report
import training
from data import ImageDataset
from helpers import Cut, assert_one_line, cli, cut_at, spy_prepare
from models import build_encoder, cls_feature, load_mae, preprocessing_of


# ----------------------------------------------------------------------------- k-NN on known features

def test_knn_two_clusters_and_cosine_not_dot_product():
    """Two well separated directions: every query takes its cluster's class, whatever the features' lengths --
    a class-1 bank vector 100 times longer than the rest does not pull class-0 queries (cosine, not dot product)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bank = torch.cat([centres[0] + 0.05 * torch.randn(10, 3, generator=g),
                      centres[1] + 0.05 * torch.randn(10, 3, generator=g)])
    bank[10] = torch.tensor([0.7, 0.7, 0.0]) * 100  # class 1, long, between the clusters
    labels = torch.tensor([0] * 10 + [1] * 10)
    queries = torch.cat([centres[0] * torch.tensor([[1.0], [3.0], [0.2]]), centres[1] * torch.tensor([[0.5], [2.0]])])
    predicted = probe.knn_predict(bank, labels, queries, num_classes=2, k=5, temperature=0.07)
    assert predicted.tolist() == [0, 0, 0, 1, 1]


def test_knn_votes_weigh_exp_similarity_over_temperature():
    """Neighbours at cosine similarity 0.9 (class 1, one) and 0.5 (class 0, two): at T = 0.07 the one close
    neighbour outweighs the two far ones (e^{0.9/0.07} > 2 e^{0.5/0.07}); at T = 10 the two win (e^{0.09} < 2 e^{0.05});
    with k = 1 only the closest votes. A plain majority vote would say class 0 for k = 3 at any temperature."""
    def at(cos):  # a unit vector at cosine `cos` to the query (1, 0)
        return [cos, math.sqrt(1 - cos ** 2)]
    bank = torch.tensor([at(0.9), at(0.5), [0.5, -math.sqrt(0.75)], at(-0.9)])
    labels = torch.tensor([1, 0, 0, 1])
    query = torch.tensor([[2.0, 0.0]])
    assert math.exp(0.9 / 0.07) > 2 * math.exp(0.5 / 0.07) and math.exp(0.9 / 10) < 2 * math.exp(0.5 / 10)
    assert probe.knn_predict(bank, labels, query, 2, k=3, temperature=0.07).tolist() == [1]
    assert probe.knn_predict(bank, labels, query, 2, k=3, temperature=10.0).tolist() == [0]
    assert probe.knn_predict(bank, labels, query, 2, k=1, temperature=10.0).tolist() == [1]
    assert probe.knn_predict(bank, labels, query, 2, k=4, temperature=0.07).tolist() == [1]  # the -0.9 adds ~0


def test_knn_chunks_give_the_answer_of_one_pass():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    whole = probe.knn_predict(bank, labels, queries, 4, k=7, temperature=0.07, chunk=1000)
    assert torch.equal(probe.knn_predict(bank, labels, queries, 4, k=7, temperature=0.07, chunk=5), whole)


# ----------------------------------------------------------------------------- the features

def test_probe_features_are_the_unmasked_cls_not_the_masked_forward(stage_args, data_dir):
    """probe.features gives, for every image of a split and in its order, cls_feature(encoder, x) on the unmasked
    image (the final LayerNorm's CLS), with the split's labels; the masked forward's CLS differs."""
    args = probe.get_args_parser().parse_args(stage_args("--probe", "linear", "--scratch", "True", batch_size=64))
    initial = load_mae("vit-mae-tiny")
    encoder = build_encoder(initial.config, initial.vit.state_dict())
    preprocessing = preprocessing_of("vit-mae-tiny").check(initial.config.image_size)
    run = training.Run.without_directory(args, "probe-linear", preprocessing)
    test_set = ImageDataset("digits", "test", data_dir, preprocessing.size, preprocessing.resample)
    table, labels = probe.features(encoder, run, test_set)
    assert table.shape == (len(test_set), initial.config.hidden_size) and table.dtype == torch.float32
    assert labels.tolist() == [test_set[i][1] for i in range(len(test_set))]

    rows = [0, 1, 2, 250, len(test_set) - 1]  # the last one is in the batch filled up with the first images
    images = run.normalize(torch.stack([test_set[i][0] for i in rows]))
    with torch.no_grad():
        unmasked = cls_feature(encoder.eval(), images)
        masked = encoder(images).last_hidden_state[:, 0]  # the library's forward: 75 % of the patches dropped
    torch.testing.assert_close(table[rows], unmasked, rtol=1e-5, atol=1e-5)
    assert (table[rows] - masked).abs().max() > 1e-2


# ----------------------------------------------------------------------------- the linear probe, end to end

def _probe(stage_args, tmp_path, *extra, steps=20):
    argv = stage_args("--probe", "linear", "--results_dir", tmp_path / "res", "--lr", 0.01, "--warmup_steps", 0, *extra,
                      batch_size=32, steps=steps)
    probe.main(probe.get_args_parser().parse_args(argv))


def test_linear_probe_from_initial_and_a_checkpoint_records_and_seeds(stage_args, tmp_path, monkeypatch):
    """From θ₀ and from a 2-step further pre-trained checkpoint: a result file with test and training accuracy and
    loss beside a run folder with the record and metrics; the checkpoint's features give other numbers; another seed
    gives another head and result; the same seed the same head and, killed and resumed, the same result."""
    pretrain.main(pretrain.get_args_parser().parse_args(stage_args(steps=2)))
    seen = spy_prepare(monkeypatch)
    _probe(stage_args, tmp_path, "--scratch", "True", "--seed", 1)
    first_head = seen["start"]
    folder = tmp_path / "res" / "digits" / "initial"
    result = json.loads((folder / "probe-linear-seed1.json").read_text())
    assert result["probe"] == "linear" and result["init"] == "initial" and result["seed"] == 1
    assert result["args"]["steps"] == 20 and result["num_test"] == 500
    assert 0.3 < result["test_acc"] <= 1.0 and 0.3 < result["train_acc"] <= 1.0  # ten classes: chance is 0.1
    assert math.isfinite(result["test_loss"]) and math.isfinite(result["train_loss"])
    record = json.loads((folder / "probe-linear-seed1" / "args.json").read_text())
    assert record["stage"] == "probe-linear" and set(record["inputs"]) == {"start", "train split", "test split"}
    assert [json.loads(line)["step"] for line in (folder / "probe-linear-seed1" / "metrics.jsonl").open()] == \
        list(range(1, 21))
    assert sorted(first_head) == ["0.num_batches_tracked", "0.running_mean", "0.running_var", "1.bias", "1.weight"]

    _probe(stage_args, tmp_path, "--ckpt_name", "further-pretrain-2", "--seed", 1)
    from_checkpoint = json.loads((tmp_path / "res" / "digits" / "further-pretrain-2" / "probe-linear-seed1.json")
                                 .read_text())
    assert from_checkpoint["checkpoint"].endswith("further-pretrain-2/digits")
    assert from_checkpoint["test_loss"] != result["test_loss"]

    _probe(stage_args, tmp_path, "--scratch", "True", "--seed", 2)
    assert not torch.equal(seen["start"]["1.weight"], first_head["1.weight"])
    other = json.loads((folder / "probe-linear-seed2.json").read_text())
    assert other["test_loss"] != result["test_loss"]

    # seed 1 again, killed after a saved state (step 9 of 20) and run again: the same head, resumed, the same result
    with training.supplied_draws(cut_at(stop=12)), pytest.raises(Cut):
        _probe(stage_args, tmp_path, "--scratch", "True", "--seed", 1, "--output_dir", tmp_path / "cut",
               "--save_every", 9)
    assert all(torch.equal(seen["start"][k], first_head[k]) for k in first_head)
    assert (tmp_path / "cut" / "train_state.pt").exists()
    _probe(stage_args, tmp_path, "--scratch", "True", "--seed", 1, "--output_dir", tmp_path / "cut", "--save_every", 9)
    resumed = json.loads((tmp_path / "cut.json").read_text())
    assert (resumed["test_acc"], resumed["test_loss"]) == (result["test_acc"], result["test_loss"])
    assert [entry["start_step"] for entry in resumed["history"]] == [0, 9]


def test_knn_run_records_once_whatever_the_seed(stage_args, tmp_path, capsys):
    """The k-NN probe writes probe-knn.json (test accuracy, k, T) with its record in probe-knn/; it trains
    nothing, so a second call with another seed (a launcher's seed loop) finds it complete."""
    argv = ["--probe", "knn", "--scratch", "True", "--results_dir", tmp_path / "res", "--knn_k", 5]
    probe.main(probe.get_args_parser().parse_args(stage_args(*argv, batch_size=128)))
    folder = tmp_path / "res" / "digits" / "initial"
    result = json.loads((folder / "probe-knn.json").read_text())
    assert result["probe"] == "knn" and (result["knn_k"], result["knn_temperature"]) == (5, 0.07)
    assert 0.2 < result["test_acc"] <= 1.0  # ten classes: chance is 0.1
    assert json.loads((folder / "probe-knn" / "args.json").read_text())["stage"] == "probe-knn"
    capsys.readouterr()
    probe.main(probe.get_args_parser().parse_args(stage_args(*argv, "--seed", 3, batch_size=128)))
    assert "already complete" in capsys.readouterr().out


def test_knn_k_larger_than_the_training_set_is_one_line(stage_args, tmp_path, monkeypatch, capsys):
    argv = stage_args("--probe", "knn", "--scratch", "True", "--results_dir", tmp_path / "res", "--knn_k", 5000)
    code, err = cli(probe, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "--knn_k 5000", "1297 training images")


# ----------------------------------------------------------------------------- report.py's probe tables

def _rows(markdown: str) -> dict[str, list[str]]:
    """{row name: [cells]} of the first table in `markdown`."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")][2:]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def test_report_shows_probe_tables_beside_fine_tuning(tmp_path, capsys):
    """Probe results get their own tables (linear: mean ± std over seeds; k-NN: one value) and probe.csv; the
    fine-tuning table and report.csv never read them."""
    res = tmp_path / "res"
    _write(res / "cub" / "initial" / "seed1.json", {"test_acc": 0.5, "test_loss": 1.0, "args": {"seed": 1}})
    for seed, acc in ((1, 0.6), (2, 0.7)):
        _write(res / "cub" / "further-pretrain-100" / f"probe-linear-seed{seed}.json",
               {"test_acc": acc, "test_loss": 2.0, "args": {"seed": seed, "probe": "linear"}})
    _write(res / "cub" / "initial" / "probe-linear-seed1.json",
           {"test_acc": 0.3, "test_loss": 2.0, "args": {"seed": 1, "probe": "linear"}})
    _write(res / "dtd" / "initial" / "probe-knn.json",
           {"test_acc": 0.25, "knn_k": 20, "knn_temperature": 0.07, "args": {"seed": 0, "probe": "knn"}})
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    text = capsys.readouterr().out
    fine_tuning, linear = text.split("## Linear probe: test accuracy (%)")
    linear, knn = linear.split("## k-NN: test accuracy (%)")
    assert "Further pre-training" not in fine_tuning and "dtd" not in fine_tuning  # no probe result read there
    assert _rows(fine_tuning) == {"Fine-tuning (initial model)": ["50.00 (n=1)"]}
    assert _rows(linear) == {"Initial model (θ₀)": ["30.00 (n=1)"],
                             "Further pre-training (100)": ["65.00 ± 7.07 (n=2)"]}
    assert _rows(knn) == {"Initial model (θ₀)": ["25.00 (n=1)"]} and "k=20, T=0.07" in knn
    with open(res / "report.csv") as f:
        assert len(f.readlines()) == 2  # the header and the one fine-tuning cell
    with open(res / "probe.csv") as f:
        rows = f.read().splitlines()
    assert rows[0] == ",".join(report.PROBE_CSV_COLUMNS)
    assert rows[1:] == ["linear,initial,Initial model (θ₀),cub,1,30.0000,,2.0000,0,",
                        "linear,further-pretrain-100,Further pre-training (100),cub,2,65.0000,7.0711,2.0000,0,",
                        "knn,initial,Initial model (θ₀),dtd,1,25.0000,,,0,"]

    (res / "cub" / "initial" / "seed1.json").unlink()  # probes only: their tables alone
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    text = capsys.readouterr().out
    assert text.startswith("## Linear probe: test accuracy (%)") and "## k-NN" in text


@pytest.mark.parametrize("name", ["probe-linear-seed1.json", "probe-knn.json"])
def test_report_without_probes_has_no_probe_table(tmp_path, capsys, name):
    res = tmp_path / "res"
    _write(res / "cub" / "initial" / "seed1.json", {"test_acc": 0.5, "test_loss": 1.0, "args": {"seed": 1}})
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    assert "probe" not in capsys.readouterr().out.lower() and not (res / "probe.csv").exists()
    _write(res / "cub" / "initial" / name, {"test_acc": 0.4, "args": {"seed": 1}})
    report.main(report.get_args_parser().parse_args(["--results_dir", str(res)]))
    assert ("Linear probe" if "linear" in name else "k-NN") in capsys.readouterr().out
