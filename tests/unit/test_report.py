"""report.py: the table's numbers against an independent recomputation, missing cells, the best
marking, row/column order, the CSV, the --init line, --steps, and bad result files."""
import csv
import json
import os
import random
import statistics

import pytest

import paper
import report
from errors import UserError
from report import get_args_parser, main, summarize

from helpers import assert_one_line, cli

SEEDS = (1, 2, 3, 4, 5)


def write_result(results_dir, dataset, init, seed, acc, loss=1.0, args=None, **extra):
    folder = os.path.join(results_dir, dataset, init)
    # the per-run folder next to each result file must be ignored
    os.makedirs(os.path.join(folder, f"seed{seed}"), exist_ok=True)
    with open(os.path.join(folder, f"seed{seed}", "args.json"), "w") as f:
        json.dump({"test_acc": 0.0}, f)
    with open(os.path.join(folder, f"seed{seed}.json"), "w") as f:
        json.dump({"test_acc": acc, "test_loss": loss, "dataset": dataset, "init": init, "seed": seed,
                   "args": {"seed": seed, **(args or {})}, **extra}, f)


def run(*argv):
    return main(get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture
def results(tmp_path):
    """{(dataset, init): [(seed, acc, loss)]} written under tmp_path/results.

    cub: all three rows, self-distillation best; dtd: initial and further pre-training only (the
    self-distillation cell is missing), one seed for further pre-training; digits: initial only."""
    rng = random.Random(0)
    plan = {("cub", "initial"): (0.60, SEEDS), ("cub", "further-pretrain-20000"): (0.70, SEEDS),
            ("cub", "self-further-pretrain-20000"): (0.80, SEEDS),
            ("dtd", "initial"): (0.50, (1, 2, 3)), ("dtd", "further-pretrain-20000"): (0.40, (7,)),
            ("digits", "initial"): (0.90, (0, 1))}
    values = {}
    for (dataset, init), (centre, seeds) in plan.items():
        values[(dataset, init)] = [(s, centre + rng.uniform(-0.03, 0.03), rng.uniform(0.5, 2.0)) for s in seeds]
        for seed, acc, loss in values[(dataset, init)]:
            write_result(tmp_path / "results", dataset, init, seed, acc, loss)
    return tmp_path / "results", values


def expected_cell(runs):
    acc = [100 * a for _, a, _ in runs]
    if len(acc) == 1:
        return f"{acc[0]:.2f} (n=1)"
    return f"{statistics.mean(acc):.2f} ± {statistics.stdev(acc):.2f} (n={len(acc)})"


def table_rows(markdown):
    """{row name: [cells]} of the first table, and its header."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, body = split[0], split[2:]
    return header, {r[0]: r[1:] for r in body}


def test_table_numbers_missing_best_and_order(results, capsys):
    results_dir, values = results
    run("--results_dir", results_dir)
    printed = capsys.readouterr().out
    with open(results_dir / "report.md") as f:
        markdown = f.read()
    assert printed == markdown

    header, rows = table_rows(markdown)
    assert header == ["", "cub", "dtd", "digits"]  # paper datasets in the paper's order, then others
    assert list(rows) == ["Fine-tuning (initial model)", "Further pre-training (20000)", "Self-distillation (20000)"]
    inits = dict(zip(rows, ["initial", "further-pretrain-20000", "self-further-pretrain-20000"]))
    for name, cells in rows.items():
        for dataset, text in zip(header[1:], cells):
            runs = values.get((dataset, inits[name]))
            if runs is None:
                assert text == "—"
                continue
            assert text.strip("*") == expected_cell(runs)
    # best per column, bold; no bold in a column with a single row of results (digits), nor where only one
    # cell has n >= 2 (dtd: 50 % over 3 seeds against 40 % of one seed)
    assert rows["Self-distillation (20000)"][0].startswith("**")
    assert not rows["Fine-tuning (initial model)"][0].startswith("**")
    assert "**" not in rows["Fine-tuning (initial model)"][1] + rows["Further pre-training (20000)"][1]
    assert rows["Self-distillation (20000)"][1] == "—"
    assert "**" not in rows["Fine-tuning (initial model)"][2]
    assert "Validation accuracy" not in markdown
    assert "Different numbers of seeds within a column: dtd (n=1, 3)." in markdown.splitlines()
    assert "Mixed settings" not in markdown


def test_csv(results):
    results_dir, values = results
    out_dir = results_dir.parent / "report"
    run("--results_dir", results_dir, "--out_dir", out_dir)
    assert not os.path.exists(results_dir / "report.csv")
    with open(out_dir / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["init", "row_name", "dataset", "n", "mean_acc", "std_acc", "mean_loss", "best",
                             "n_val", "mean_val_acc", "std_val_acc", "best_val", "settings", "metric", "mean_metric",
                             "std_metric", "n_val_metric", "mean_val_metric", "std_val_metric"]
    assert {(r["dataset"], r["init"]) for r in rows} == set(values)  # the missing cell has no row
    for r in rows:
        runs = values[(r["dataset"], r["init"])]
        acc = [100 * a for _, a, _ in runs]
        assert int(r["n"]) == len(runs)
        assert float(r["mean_acc"]) == pytest.approx(statistics.mean(acc), abs=1e-4)
        assert float(r["mean_loss"]) == pytest.approx(statistics.mean(l for _, _, l in runs), abs=1e-4)
        if len(runs) > 1:
            assert float(r["std_acc"]) == pytest.approx(statistics.stdev(acc), abs=1e-4)
        else:
            assert r["std_acc"] == ""
        assert r["n_val"] == r["mean_val_acc"] == r["settings"] == ""
        assert r["metric"] == "acc" and (r["mean_metric"], r["std_metric"]) == (r["mean_acc"], r["std_acc"])
    best = {(r["dataset"], r["init"]) for r in rows if r["best"] == "1"}
    assert best == {("cub", "self-further-pretrain-20000")}


def test_summarize(results):
    results_dir, values = results
    summaries = summarize(results_dir, datasets=["dtd"])
    assert set(summaries) == {("dtd", "initial"), ("dtd", "further-pretrain-20000")}
    s = summaries[("dtd", "initial")]
    acc = [100 * a for _, a, _ in values[("dtd", "initial")]]
    assert s["seeds"] == [1, 2, 3] and s["n"] == 3
    assert s["mean_acc"] == pytest.approx(statistics.mean(acc))
    assert s["std_acc"] == pytest.approx(statistics.stdev(acc))
    assert summaries[("dtd", "further-pretrain-20000")]["std_acc"] is None
    assert set(summarize(results_dir, seeds=[7])) == {("dtd", "further-pretrain-20000")}


def test_init_line(results, capsys):
    results_dir, values = results
    run("--results_dir", results_dir, "--datasets", "cub", "--init", "self-further-pretrain-20000")
    acc = [100 * a for _, a, _ in values[("cub", "self-further-pretrain-20000")]]
    assert capsys.readouterr().out == (f"cub self-further-pretrain-20000: test accuracy {statistics.mean(acc):.2f} ± "
                                       f"{statistics.stdev(acc):.2f} % over 5 seeds (1 2 3 4 5)\n")
    assert not os.path.exists(results_dir / "report.md")

    # --seeds: only the seeds a launcher just ran; one it ran without a result is an error
    run("--results_dir", results_dir, "--datasets", "cub", "--init", "initial", "--seeds", 4, 2)
    acc = [100 * a for s, a, _ in values[("cub", "initial")] if s in (2, 4)]
    assert capsys.readouterr().out == (f"cub initial: test accuracy {statistics.mean(acc):.2f} ± "
                                       f"{statistics.stdev(acc):.2f} % over 2 seeds (2 4)\n")
    run("--results_dir", results_dir, "--datasets", "dtd", "--init", "further-pretrain-20000")
    assert capsys.readouterr().out.endswith("% over 1 seed (7)\n")
    with pytest.raises(UserError, match="no result for seed 9"):
        run("--results_dir", results_dir, "--datasets", "cub", "--init", "initial", "--seeds", 1, 9)
    with pytest.raises(UserError, match="no results for init 'self-further-pretrain-20000'"):
        run("--results_dir", results_dir, "--datasets", "dtd", "--init", "self-further-pretrain-20000")


def test_steps_and_other_inits(results, capsys):
    results_dir, _ = results
    write_result(results_dir, "cub", "further-pretrain-5000", 1, 0.65)
    write_result(results_dir, "cub", "self-further-pretrain-5000", 1, 0.66)
    write_result(results_dir, "aircraft", "my-checkpoint", 1, 0.30)
    run("--results_dir", results_dir)
    header, rows = table_rows(capsys.readouterr().out)
    assert header[:3] == ["", "aircraft", "cub"]
    assert list(rows) == ["Fine-tuning (initial model)", "Further pre-training (5000)", "Further pre-training (20000)",
                          "Self-distillation (5000)", "Self-distillation (20000)", "my-checkpoint"]
    run("--results_dir", results_dir, "--steps", 5000, "--datasets", "cub", "chest_xray")
    header, rows = table_rows(capsys.readouterr().out)
    assert header == ["", "chest_xray", "cub"]  # a named dataset without results: a column of —
    assert list(rows) == ["Fine-tuning (initial model)", "Further pre-training (5000)", "Self-distillation (5000)"]
    assert all(cells[0] == "—" for cells in rows.values())


def test_validation_table(tmp_path, capsys):
    accs = {("initial", 1): (0.5, 0.55), ("initial", 2): (0.52, 0.58), ("further-pretrain-20000", 1): (0.6, None)}
    for (init, seed), (test_acc, val_acc) in accs.items():
        extra = {"val_acc": val_acc, "val_loss": 1.0} if val_acc is not None else {}
        write_result(tmp_path, "cub", init, seed, test_acc, **extra)
    run("--results_dir", tmp_path)
    markdown = capsys.readouterr().out
    val_table = markdown.split("## Validation accuracy (%)")[1]
    _, rows = table_rows(val_table)
    val = [55.0, 58.0]
    assert rows["Fine-tuning (initial model)"] == [f"{statistics.mean(val):.2f} ± {statistics.stdev(val):.2f} (n=2)"]
    assert rows["Further pre-training (20000)"] == ["—"]


@pytest.mark.parametrize("content", ["{not json", '{"test_loss": 1.0}', '{"test_acc": 85.2}', "[1, 2]"])
def test_bad_result_file(tmp_path, content):
    write_result(tmp_path, "cub", "initial", 1, 0.5)
    bad = tmp_path / "cub" / "initial" / "seed2.json"
    bad.write_text(content)
    with pytest.raises(UserError, match=str(bad)):
        run("--results_dir", tmp_path)


def test_runs_of_different_settings_are_not_averaged(tmp_path, capsys):
    """A cell whose seeds ran with different settings shows no mean; a note gives each group's; seeds
    that differ only in what does not change results (workers, device, paths) are averaged."""
    base = {"lr": 1e-4, "steps": 10000, "batch_size": 32, "model_name": "facebook/vit-mae-base"}
    for seed, acc, lr in ((1, 0.80, 1e-4), (2, 0.82, 1e-4), (3, 0.50, 1e-3)):
        write_result(tmp_path, "cub", "initial", seed, acc,
                     args={**base, "lr": lr, "workers": seed, "device": f"cuda:{seed}", "output_dir": f"o{seed}"})
    for seed, acc in ((1, 0.70), (2, 0.72)):
        write_result(tmp_path, "cub", "further-pretrain-20000", seed, acc, args={**base, "workers": 8 - seed})
    for seed, acc in ((1, 0.75), (2, 0.77)):  # 1000 steps instead of 10000, in one seed only
        write_result(tmp_path, "cub", "self-further-pretrain-20000", seed, acc,
                     args={**base, "steps": 1000 if seed == 2 else 10000})
    run("--results_dir", tmp_path)
    markdown = capsys.readouterr().out
    _, rows = table_rows(markdown)
    assert rows["Fine-tuning (initial model)"] == ["mixed settings [1]"]
    # averaged (workers differ); not bold: the mixed cells have no mean to compete with
    assert rows["Further pre-training (20000)"] == [f"{statistics.mean([70, 72]):.2f} ± "
                                                    f"{statistics.stdev([70, 72]):.2f} (n=2)"]
    assert rows["Self-distillation (20000)"] == ["mixed settings [2]"]
    lines = markdown.splitlines()
    assert (f"[1] cub, Fine-tuning (initial model): lr=0.0001: {statistics.mean([80, 82]):.2f} ± "
            f"{statistics.stdev([80, 82]):.2f} (n=2), seeds 1 2; lr=0.001: 50.00 (n=1), seeds 3") in lines
    assert "[2] cub, Self-distillation (20000): steps=10000: 75.00 (n=1), seeds 1; steps=1000: 77.00 (n=1), seeds 2" in lines

    groups = summarize(tmp_path)[("cub", "initial")]["groups"]
    assert [(g["seeds"], g["settings"]) for g in groups] == [([1, 2], {"lr": 1e-4}), ([3], {"lr": 1e-3})]
    with open(tmp_path / "report.csv") as f:
        csv_rows = [r for r in csv.DictReader(f) if r["init"] == "initial"]
    assert [(r["n"], r["settings"], r["best"]) for r in csv_rows] == [("2", "lr=0.0001", "0"), ("1", "lr=0.001", "0")]

    # the one-line summary (what run_finetune.sh ends with): one line per settings group
    run("--results_dir", tmp_path, "--datasets", "cub", "--init", "initial")
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0].startswith("cub initial (lr=0.0001): test accuracy 81.00")
    assert out[1] == "cub initial (lr=0.001): test accuracy 50.00 % over 1 seed (3)"


def test_bold_only_among_cells_of_several_seeds(tmp_path, capsys):
    """A single seed's higher accuracy does not take the bold from a mean over several seeds."""
    for seed in (1, 2, 3):
        write_result(tmp_path, "dtd", "initial", seed, 0.60 + seed / 100)
        write_result(tmp_path, "dtd", "further-pretrain-20000", seed, 0.55 + seed / 100)
    write_result(tmp_path, "dtd", "self-further-pretrain-20000", 1, 0.90)
    run("--results_dir", tmp_path)
    markdown = capsys.readouterr().out
    _, rows = table_rows(markdown)
    assert rows["Fine-tuning (initial model)"][0].startswith("**")  # 62 % over 3 seeds
    assert rows["Self-distillation (20000)"] == ["90.00 (n=1)"]      # higher, but one seed: not bold
    assert not rows["Further pre-training (20000)"][0].startswith("**")
    assert "among its cells of n >= 2 seeds" in markdown
    assert "Different numbers of seeds within a column: dtd (n=1, 3)." in markdown.splitlines()


# ----------------------------------------------------------------------------- text datasets: their metric

def write_text_result(results_dir, dataset, init, seed, acc, macro, micro, train=None, val=None, **extra):
    """A text fine-tuning result: accuracy, macro-F1 and micro-F1 (fractions), each different, so a table that shows
    the wrong one fails; `train` / `val`: (acc, macro, micro) of those splits."""
    for split, scores in (("train", train), ("val", val)):
        if scores is not None:
            extra.update(dict(zip((f"{split}_acc", f"{split}_macro_f1", f"{split}_micro_f1"), scores)))
    write_result(results_dir, dataset, init, seed, acc, modality="text", test_macro_f1=macro, test_micro_f1=micro,
                 **extra)


def pct(values):
    """`mean ± std (n=k)` of fractions, as a cell shows them."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.2f} (n=1)"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f} (n={len(values)})"


@pytest.fixture
def mixed(tmp_path):
    """Image and text results side by side: cub and digits (images), chemprot (micro-F1), fortunes (macro-F1) and
    a user's own text dataset `reviews` (macro-F1, known only by its results' modality). In chemprot and fortunes
    the routes rank differently by accuracy, macro-F1 and micro-F1, so the bold shows which one was compared."""
    r = tmp_path / "results"
    scores = {  # (dataset, init): [(acc, macro, micro)] per seed 1, 2
        ("chemprot", "initial"): [(0.80, 0.50, 0.60), (0.82, 0.52, 0.62)],
        ("chemprot", "further-pretrain-20000"): [(0.70, 0.60, 0.70), (0.72, 0.62, 0.72)],
        ("chemprot", "self-further-pretrain-20000"): [(0.60, 0.70, 0.65), (0.62, 0.72, 0.66)],
        ("fortunes", "initial"): [(0.40, 0.30, 0.40), (0.42, 0.31, 0.42)],
        ("fortunes", "further-pretrain-20000"): [(0.30, 0.35, 0.30), (0.31, 0.36, 0.31)],
        ("reviews", "initial"): [(0.90, 0.45, 0.90)],
    }
    for (dataset, init), seeds in scores.items():
        for seed, (acc, macro, micro) in enumerate(seeds, 1):
            write_text_result(r, dataset, init, seed, acc, macro, micro,
                              train=(acc + 0.1, macro + 0.2, micro + 0.05))
    for seed, (a, b) in enumerate(((0.50, 0.60), (0.52, 0.58)), 1):
        write_result(r, "cub", "initial", seed, a, train_acc=a + 0.1)
        write_result(r, "cub", "further-pretrain-20000", seed, b, train_acc=b + 0.1)
    write_result(r, "digits", "initial", 1, 0.95)
    return r, scores


def test_text_and_image_datasets_in_one_table_each_with_its_metric(mixed, capsys):
    results_dir, scores = mixed
    run("--results_dir", results_dir)
    markdown = capsys.readouterr().out
    assert "## Test accuracy / micro-F1 / macro-F1 (%), each column's metric in its header" in markdown.splitlines()
    header, rows = table_rows(markdown)
    # the paper's image datasets, its text datasets, then the others alphabetically
    assert header == ["", "cub (accuracy)", "chemprot (micro-F1)", "digits (accuracy)", "fortunes (macro-F1)",
                      "reviews (macro-F1)"]
    inits = dict(zip(rows, ["initial", "further-pretrain-20000", "self-further-pretrain-20000"]))
    which = {"chemprot": 2, "fortunes": 1, "reviews": 1}  # micro, macro, macro
    for name, cells in rows.items():
        for column, text in zip(header[1:], cells):
            dataset = column.split()[0]
            if dataset in which:
                runs = scores.get((dataset, inits[name]))
                expected = pct([s[which[dataset]] for s in runs]) if runs else "—"
                assert text.strip("*") == expected, (name, dataset)
    # bold by the column's metric: chemprot's best micro-F1 is further pre-training's (by accuracy: the initial
    # model's, by macro-F1: self-distillation's); fortunes': further pre-training's (by accuracy: the initial model's)
    bold = {(column, name) for name, cells in rows.items() for column, text in zip(header[1:], cells)
            if text.startswith("**")}
    assert bold == {("chemprot (micro-F1)", "Further pre-training (20000)"), ("cub (accuracy)", "Further pre-training "
                    "(20000)"), ("fortunes (macro-F1)", "Further pre-training (20000)")}
    assert rows["Fine-tuning (initial model)"][0] == pct([0.50, 0.52])  # cub: accuracy
    assert report.METRICS_NOTE in markdown.splitlines()


def test_a_table_of_one_text_metric_names_it_in_its_title(mixed, capsys):
    results_dir, scores = mixed
    run("--results_dir", results_dir, "--datasets", "fortunes", "citation_intent")
    markdown = capsys.readouterr().out
    assert markdown.startswith("## Test macro-F1 (%)\n")
    header, rows = table_rows(markdown)
    assert header == ["", "citation_intent", "fortunes"]  # a named text column without results: macro-F1 too
    assert rows["Fine-tuning (initial model)"] == ["—", pct([s[1] for s in scores[("fortunes", "initial")]])]
    run("--results_dir", results_dir, "--datasets", "cub", "digits")  # images alone: as before, no metric note
    markdown = capsys.readouterr().out
    assert markdown.startswith("## Test accuracy (%)\n") and report.METRICS_NOTE not in markdown
    assert table_rows(markdown)[0] == ["", "cub", "digits"]


def test_text_training_and_validation_tables_and_csv_show_the_metric(mixed, tmp_path, capsys):
    results_dir, scores = mixed
    for seed in (1, 2):
        write_text_result(results_dir, "sciie", "initial", seed, 0.5, 0.4, 0.5, val=(0.9, 0.3 + seed / 10, 0.8))
    run("--results_dir", results_dir, "--train")
    markdown = capsys.readouterr().out
    val_title, val_table = markdown.split("## Validation ")[1].split("\n## ")[0].split("\n", 1)
    assert val_title == "macro-F1 (%)"
    assert table_rows(val_table)[1]["Fine-tuning (initial model)"] == [pct([0.4, 0.5])]
    train_title, train_table = markdown.split("## Training ")[1].split("\n", 1)
    assert train_title == "accuracy / micro-F1 / macro-F1 (%), each column's metric in its header"
    header, rows = table_rows(train_table)
    assert header == ["", "cub (accuracy)", "chemprot (micro-F1)", "fortunes (macro-F1)", "reviews (macro-F1)"]
    assert rows["Further pre-training (20000)"] == [pct([0.70, 0.68]), pct([0.75, 0.77]), pct([0.55, 0.56]), "—"]

    with open(results_dir / "report.csv") as f:
        csv_rows = {(r["dataset"], r["init"]): r for r in csv.DictReader(f)}
    for (dataset, init), runs in scores.items():
        r = csv_rows[(dataset, init)]
        metric = "micro_f1" if dataset == "chemprot" else "macro_f1"
        column = 2 if dataset == "chemprot" else 1
        assert r["metric"] == metric
        assert float(r["mean_metric"]) == pytest.approx(100 * statistics.mean(s[column] for s in runs), abs=1e-4)
        assert float(r["mean_acc"]) == pytest.approx(100 * statistics.mean(s[0] for s in runs), abs=1e-4)
        assert float(r["mean_train_metric"]) == pytest.approx(
            100 * statistics.mean(s[column] + (0.05 if column == 2 else 0.2) for s in runs), abs=1e-4)
    assert csv_rows[("cub", "initial")]["metric"] == "acc"
    assert {k for k, r in csv_rows.items() if r["best"] == "1"} == {
        ("chemprot", "further-pretrain-20000"), ("fortunes", "further-pretrain-20000"),
        ("cub", "further-pretrain-20000")}
    assert csv_rows[("sciie", "initial")]["mean_val_metric"] == "45.0000"


def test_the_init_line_of_a_text_dataset_names_its_metric(mixed, capsys):
    results_dir, scores = mixed
    run("--results_dir", results_dir, "--datasets", "chemprot", "fortunes", "cub", "--init", "initial", "--train")
    lines = capsys.readouterr().out.splitlines()
    micro = [100 * s[2] for s in scores[("chemprot", "initial")]]
    assert lines[0] == (f"cub initial: test accuracy 51.00 ± {statistics.stdev([50, 52]):.2f} % over 2 seeds (1 2); "
                        f"training accuracy 61.00 ± {statistics.stdev([60, 62]):.2f} % (lowest 60.00, n=2)")
    assert lines[1].startswith(f"chemprot initial: test micro-F1 {statistics.mean(micro):.2f} ± "
                               f"{statistics.stdev(micro):.2f} % over 2 seeds (1 2); training micro-F1 ")
    assert lines[2].startswith("fortunes initial: test macro-F1 30.50 ± ")


def test_text_runs_of_different_settings_are_not_averaged_and_their_note_shows_the_metric(tmp_path, capsys):
    for seed, lr in ((1, 1e-4), (2, 1e-3)):
        write_text_result(tmp_path, "chemprot", "initial", seed, 0.9, 0.5, 0.6 + seed / 10, args={"lr": lr})
    run("--results_dir", tmp_path)
    markdown = capsys.readouterr().out
    assert table_rows(markdown)[1]["Fine-tuning (initial model)"] == ["mixed settings [1]"]
    assert ("[1] chemprot, Fine-tuning (initial model): lr=0.0001: 70.00 (n=1), seeds 1; lr=0.001: 80.00 (n=1), "
            "seeds 2") in markdown.splitlines()


def test_image_and_text_results_of_one_dataset_are_refused_not_averaged(tmp_path, monkeypatch, capsys):
    write_result(tmp_path, "reviews", "initial", 1, 0.5)
    write_text_result(tmp_path, "reviews", "initial", 2, 0.6, 0.4, 0.6)
    code, err = cli(report, ["--results_dir", tmp_path], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, str(tmp_path / "reviews"), "image and text results", "must not average together")
    assert not os.path.exists(tmp_path / "report.md")


@pytest.mark.parametrize("dataset, extra, words", [
    ("fortunes", {"modality": "text", "test_micro_f1": 0.5}, ["no test_macro_f1, the metric of fortunes"]),
    ("reviews", {"modality": "audio"}, ["modality is 'audio'"]),
    ("chemprot", {}, ["no test_micro_f1, the metric of chemprot"]),  # a known text dataset's results without F1
    ("fortunes", {"modality": "text", "test_macro_f1": 52.0, "test_micro_f1": 0.5}, ["test_macro_f1 is 52.0"]),
])
def test_a_text_result_without_its_metric_is_one_line_naming_the_file(tmp_path, monkeypatch, capsys, dataset, extra,
                                                                      words):
    write_result(tmp_path, dataset, "initial", 1, 0.5, **extra)
    code, err = cli(report, ["--results_dir", tmp_path], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, str(tmp_path / dataset / "initial" / "seed1.json"), *words)


def test_the_metric_rule_and_the_text_datasets_are_those_data_builds():
    from data.text import TEXT_DATASETS
    assert set(paper.TEXT_DATASETS) == set(TEXT_DATASETS)
    assert [paper.metric(d) for d in paper.PAPER_TEXT_DATASETS] == ["micro_f1", "macro_f1", "macro_f1", "macro_f1"]
    assert paper.metric("fortunes") == paper.metric("mine", "text") == "macro_f1"
    assert paper.metric("cub") == paper.metric("mine") == paper.metric("mine", "image") == "acc"
