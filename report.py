"""The paper's results table: the test score, mean ± std over the fine-tuning seeds, per (init, dataset); accuracy
for image datasets, F1 for text datasets.

Reads the result files that finetune.py writes, `<results_dir>/<dataset>/<init>/seed<k>.json`
(only those: the per-run folders `seed<k>/` are skipped), where <init> is `initial` (fine-tuned from
θ₀), `further-pretrain-<steps>`, `self-further-pretrain-<steps>`, or any other checkpoint name.

    python report.py                                   # results/report.md, results/report.csv; prints the table
    python report.py --datasets cub dtd --steps 20000
    python report.py --datasets cub --init self-further-pretrain-20000   # one line: mean ± std of its seeds
    python report.py --datasets cub --init initial --seeds 1 2 3         # ... of these seeds (run_finetune.sh)

The table. Rows: "Fine-tuning (initial model)", "Further pre-training (<steps>)",
"Self-distillation (<steps>)" (steps ascending within each), then other checkpoints by name.
Columns: the paper's six image datasets in its order (aircraft, chest_xray, cub, dtd, stanford_dogs,
vgg_flower_102), its four text datasets (chemprot, citation_intent, sciie, twitter_emotion), then other datasets
alphabetically. A cell is the test score of the column's dataset in percent,
`mean ± std (n=seeds)` with the sample standard deviation (ddof=1), or `mean (n=1)` for one seed;
`—` where there are no results (never 0). If some results carry a validation score
(finetune.py --val_split), a second table shows it the same way, for those datasets. With --train, one more
table shows the score on the training examples (train_acc, ...: eval mode, after the last step, without the
--val_split part) the same way, without bold, for the results that have it (a result whose record does not hold
it has None: training/record.py), and the --init line adds it.

The score (paper.metric, written once there): accuracy for image datasets (test_acc); for text datasets -- the
known ones by name (paper.TEXT_DATASETS), a user's own by its results' "modality": "text" -- micro-F1 for chemprot
(test_micro_f1) and macro-F1 for every other (test_macro_f1), as Gururangan et al. 2020 report them; val_ and train_
likewise. Image and text datasets share one table: when its columns share one metric the title names it (`Test
accuracy (%)`, `Test macro-F1 (%)`), else each column's header does (`chemprot (micro-F1)`, `cub (accuracy)`), and a
line below the table gives the rule whenever a text dataset is there. A dataset folder holding both image and text
results (two metrics), or a result without its dataset's metric, is refused in one line naming the files: scores of
different metrics are never averaged, nor compared for the bold.

Only runs of the same settings are averaged. The settings are the run's arguments recorded in each
seed<k>.json, except those that do not change the result (NOT_SETTINGS: the seed, paths, and
utils.RESULT_NEUTRAL_FLAGS -- workers, logging, saving, device, data cache), plus what the run started from and
read, by content (the checkpoint's and the splits' fingerprints from the record, not their paths), and the
precision and device type it ran with. A cell whose seeds were run with different settings (say, two --lr
values, or two different checkpoints under one name) shows `mixed settings [k]` instead of a mean, and note
[k] below the table gives each group's mean ± std with the settings that differ. Records that do not hold
their inputs or numerics (written before they were recorded: training/record.py) are compared on their arguments
alone.

Bold: the best mean of a column (ties: all of them) among its cells with at least 2 seeds, when there
are at least two such cells; a single seed has no spread, so it is never bold and never beats a mean
over several. A note below the table names the columns whose cells average different numbers of seeds.

report.csv: one row per (init, dataset) that has results (per settings group for a mixed cell), columns
init,row_name,dataset,n,mean_acc,std_acc,mean_loss,best,n_val,mean_val_acc,std_val_acc,best_val,settings,
metric,mean_metric,std_metric,n_val_metric,mean_val_metric,std_val_metric;
the *_acc columns the accuracy (of text runs too), metric the dataset's (acc, macro_f1 or micro_f1) and *_metric
the table's numbers of it (for images, the accuracy again); scores in percent, mean_loss the mean test
cross-entropy, best / best_val 1 for the bold cells (else 0), std empty for a single seed, the val columns empty
without validation results, settings the group's differing settings (`lr=0.001 steps=5000`) for a mixed cell, else
empty. With --train, seven more columns: n_train,mean_train_acc,std_train_acc,mean_train_loss,n_train_metric,
mean_train_metric,std_train_metric (empty without training results).

Probes (probe.py), only when there are any: `<results_dir>/<dataset>/<init>/probe-linear-seed<k>.json` and
`probe-knn.json`, which the fine-tuning table never reads (its files are seed<k>.json). Below the fine-tuning tables,
a "Linear probe" table (mean ± std over seeds, as above, --seeds applies) and a "k-NN" table (one run per cell, no
seed, never bold), with the same rows (the initial model's row named "Initial model (θ₀)") and columns, --steps
applied, settings compared as above; their score is the accuracy, for every dataset. Their numbers go to probe.csv
beside report.csv, columns protocol,init,row_name,dataset,n,mean_acc,std_acc,mean_loss,best,settings (protocol:
linear or knn). With only probe results, report.md holds the probe tables alone and report.csv is not written.
--init shows fine-tuning only.
"""
import argparse
import csv
import io
import json
import os
import posixpath
import re
import statistics

import outputs
import paper
import utils
from training.record import upgrade
from training.run_dir import recorded_inputs
from data.datasets import file_kind

PAPER_DATASETS = paper.PAPER_DATASETS
INITIAL = paper.INITIAL
FURTHER_PRETRAIN = re.compile("^" + paper.teacher(r"(\d+)") + "$")  # the checkpoints' names, with their steps
SELF_DISTILL = re.compile("^" + paper.student(r"(\d+)") + "$")
RESULT_FILE = re.compile(r"^seed(\d+)\.json$")
PROBE_FILES = {"linear": re.compile(r"^probe-linear-seed(\d+)\.json$"), "knn": re.compile(r"^probe-knn\.json$")}
PROBE_TITLES = {"linear": "Linear probe", "knn": "k-NN"}
PROBE_CSV_COLUMNS = ("protocol", "init", "row_name", "dataset", "n", "mean_acc", "std_acc", "mean_loss", "best",
                     "settings")
MISSING = "—"
MODALITIES = ("image", "text")  # a result's "modality" (absent: image)
CSV_COLUMNS = ("init", "row_name", "dataset", "n", "mean_acc", "std_acc", "mean_loss", "best",
               "n_val", "mean_val_acc", "std_val_acc", "best_val", "settings")
TRAIN_CSV_COLUMNS = ("n_train", "mean_train_acc", "std_train_acc", "mean_train_loss")  # with --train
# The dataset's metric (paper.metric) and the table's numbers of it; for image datasets, the accuracy again
METRIC_CSV_COLUMNS = ("metric", "mean_metric", "std_metric", "n_val_metric", "mean_val_metric", "std_val_metric")
TRAIN_METRIC_CSV_COLUMNS = ("n_train_metric", "mean_train_metric", "std_train_metric")  # with --train
# Recorded arguments that do not change a run's result (utils.RESULT_NEUTRAL_FLAGS, the list resume uses too),
# those implied by the cell (dataset, init) and the paths the inputs were read from: runs differing only in these
# are averaged together.
NOT_SETTINGS = utils.RESULT_NEUTRAL_FLAGS | {"seed", "dataset", "scratch", "ckpt_name", "data_dir", "checkpoint_dir"}
NUMERICS = ("precision", "device_type")  # as each start ran: they change the numbers
MIN_SEEDS_FOR_BEST = 2
METRICS_NOTE = ("Metrics: accuracy for image datasets; for text datasets, micro-F1 for chemprot and macro-F1 for the "
                "others (as Gururangan et al. 2020 report them), a user's text dataset included.")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Mean ± std of the fine-tuning results, as the paper's table.",
                                allow_abbrev=False)
    p.add_argument("--results_dir", default="results", help="finetune.py's --results_dir")
    p.add_argument("--datasets", nargs="+", default=None,
                   help="columns to show (default: every dataset with results); a named dataset without "
                        "results shows as a column of —")
    p.add_argument("--out_dir", default=None, help="where report.md and report.csv go (default: --results_dir)")
    p.add_argument("--steps", type=int, default=None,
                   help="keep only the further pre-training / self-distillation rows of this many steps "
                        "(the initial model's row and other checkpoints stay)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="only the results of these fine-tuning seeds (default: all); with --init, a missing "
                        "one is an error")
    p.add_argument("--init", default=None,
                   help="print one line per dataset for this init only (e.g. self-further-pretrain-20000); "
                        "writes no files")
    p.add_argument("--train", action="store_true",
                   help="also show the accuracy on the training images (a table, CSV columns, the --init line): "
                        "whether fine-tuning fitted its training set")
    return p


# ----------------------------------------------------------------------------- reading

def read_result(path: str) -> dict:
    """One seed<k>.json, checked, in today's shape (training.record.upgrade): a clear error naming the file if it
    is not a finetune.py result."""
    if not os.path.isfile(path):  # opening a FIFO would wait for ever
        raise utils.UserError(f"result file {path} is {file_kind(os.stat(path).st_mode)}, not a file")
    try:
        with open(path) as f:
            result = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise utils.UserError(f"cannot read result file {path}: {e}") from None
    if isinstance(result, dict):
        result = upgrade(result, path)
    if not isinstance(result, dict) or "test_acc" not in result:
        raise utils.UserError(f"result file {path} has no test_acc (not written by finetune.py?)")
    modality = result.get("modality", "image")
    if modality not in MODALITIES:
        raise utils.UserError(f"result file {path}: modality is {modality!r}, expected {' or '.join(MODALITIES)}")
    scores = [f"{split}_{m}" for split in ("test", "val", "train") for m in paper.METRIC_NAMES]
    for key in ["test_acc"] + [k for k in scores if k != "test_acc" and result.get(k) is not None]:
        value = result[key]
        if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
            raise utils.UserError(f"result file {path}: {key} is {value!r}, expected a fraction in [0, 1]")
    return result


def find_results(results_dir: str, datasets=None, seeds=None, pattern=RESULT_FILE
                 ) -> dict[tuple[str, str], dict[int, dict]]:
    """{(dataset, init): {seed: result}} for every <results_dir>/<dataset>/<init>/seed<k>.json (or other file names:
    `pattern`, its group 1 the seed; a pattern without a group, the k-NN probe's, counts as seed 0).

    <init> is the path below the dataset folder, so a --ckpt_name with a slash is one init too."""
    if not os.path.isdir(results_dir):
        raise utils.UserError(f"results directory not found: {results_dir} (finetune.py writes it)")

    def unreadable(e: OSError):  # os.walk would skip the folder, and the table would lack its runs
        raise utils.UserError(f"cannot read the results folder {e.filename}: {e.strerror or e} (its runs would be "
                              f"missing from the table)")
    try:
        datasets_found = sorted(os.listdir(results_dir))
    except OSError as e:
        unreadable(e)
    found = {}
    for dataset in datasets_found:
        dataset_root = os.path.join(results_dir, dataset)
        if dataset.startswith(".") or not os.path.isdir(dataset_root) or (datasets and dataset not in datasets):
            continue
        for root, dirs, files in os.walk(dataset_root, onerror=unreadable):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            paths = {int(m.group(1)) if m.lastindex else 0: os.path.join(root, f)
                     for f in files if (m := pattern.match(f))}
            paths = {seed: path for seed, path in sorted(paths.items()) if seeds is None or seed in seeds}
            if paths and root != dataset_root:
                init = os.path.relpath(root, dataset_root).replace(os.sep, "/")
                found[(dataset, init)] = {seed: read_result(path) for seed, path in paths.items()}
    return found


# ----------------------------------------------------------------------------- statistics

def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def settings_of(result: dict) -> dict:
    """What a run's result depends on, from its record: the recorded arguments that change it, what it started
    from and read (`<label> content`: the first 12 hex digits of each input's fingerprint -- the checkpoint's,
    the splits' -- instead of their paths), and the numerics it ran with (precision, device type); None where the
    record does not hold it. `result`: as read_result reads it."""
    args = result["args"]
    if not isinstance(args, dict):
        return {}
    settings = {k: v for k, v in args.items() if k not in NOT_SETTINGS}
    for label, fingerprint in recorded_inputs(result).items():
        settings[f"{label} content"] = str(fingerprint.get("sha256"))[:12] if isinstance(fingerprint, dict) else None
    last = result["history"][-1]
    settings.update({key: last[key] for key in NUMERICS})
    return settings


def _comparable(all_settings: list[dict]) -> list[dict]:
    """The settings without the inputs and numerics that some run's record does not hold (None, or inputs not
    recorded at all): the runs are compared on what they all hold, rather than shown as mixed."""
    late = {k for st in all_settings for k in st if k.endswith(" content") or k in NUMERICS}
    unknown = {k for k in late if any(st.get(k) is None for st in all_settings)}
    return [{k: v for k, v in st.items() if k not in unknown} for st in all_settings]


def _stats(by_seed: dict[int, dict], metric: str = "acc") -> dict:
    results = list(by_seed.values())
    acc = [100.0 * r["test_acc"] for r in results]
    losses = [r["test_loss"] for r in results if isinstance(r.get("test_loss"), (int, float))]
    val = [100.0 * r["val_acc"] for r in results if r.get("val_acc") is not None]
    train = [100.0 * r["train_acc"] for r in results if r.get("train_acc") is not None]
    train_losses = [r["train_loss"] for r in results if isinstance(r.get("train_loss"), (int, float))]
    mean_acc, std_acc = _mean_std(acc)
    mean_val, std_val = _mean_std(val)
    mean_train, std_train = _mean_std(train)
    stats = {"seeds": sorted(by_seed), "n": len(acc), "mean_acc": mean_acc, "std_acc": std_acc,
             "mean_loss": statistics.fmean(losses) if losses else None,
             "n_val": len(val), "mean_val_acc": mean_val, "std_val_acc": std_val,
             "n_train": len(train), "mean_train_acc": mean_train, "std_train_acc": std_train,
             "min_train_acc": min(train) if train else None,
             "mean_train_loss": statistics.fmean(train_losses) if train_losses else None, "metric": metric}
    # the table's score: the dataset's metric (paper.metric), over the results that hold it
    for split, prefix in (("test", ""), ("val", "val_"), ("train", "train_")):
        values = [100.0 * r[f"{split}_{metric}"] for r in results if r.get(f"{split}_{metric}") is not None]
        stats[f"n_{prefix}metric"] = len(values)
        stats[f"mean_{prefix}metric"], stats[f"std_{prefix}metric"] = _mean_std(values)
    stats["min_train_metric"] = min((100.0 * r[f"train_{metric}"] for r in results
                                     if r.get(f"train_{metric}") is not None), default=None)
    return stats


def dataset_metrics(results_dir: str, found: dict[tuple[str, str], dict[int, dict]]) -> dict[str, str]:
    """{dataset: its metric} (paper.metric of its name and its results' modality), checked: every result of the
    dataset holds test_<metric>, and no dataset holds runs of two metrics (image and text runs under one name),
    which the table must never average together."""
    metrics = {}
    for (dataset, init), by_seed in found.items():
        for seed, result in by_seed.items():
            path = os.path.join(results_dir, dataset, init, f"seed{seed}.json")
            modality = result.get("modality", "image")
            metric = paper.metric(dataset, modality)
            first = metrics.setdefault(dataset, (metric, path, modality))
            if metric != first[0]:
                raise utils.UserError(
                    f"{os.path.join(results_dir, dataset)} holds {first[2]} and {modality} results ({first[1]}, "
                    f"{path}), which the table reports in different metrics ({paper.METRIC_NAMES[first[0]]}, "
                    f"{paper.METRIC_NAMES[metric]}) and must not average together: move one kind to another "
                    f"--results_dir")
            if not isinstance(result.get(f"test_{metric}"), (int, float)):
                raise utils.UserError(f"result file {path} has no test_{metric}, the metric of {dataset} "
                                      f"({paper.METRIC_NAMES[metric]}): not a fine-tuning result on {dataset}'s "
                                      f"{'texts' if metric != 'acc' else 'images'}?")
    return {dataset: metric for dataset, (metric, _, _) in metrics.items()}


def summarize(results_dir: str, datasets=None, seeds=None, pattern=RESULT_FILE) -> dict[tuple[str, str], dict]:
    """{(dataset, init): summary} over the seeds of each (or those of `seeds` only); scores in percent.

    summary: seeds (sorted list), n, mean_acc, std_acc (sample std; None for one seed), mean_loss,
    and n_val, mean_val_acc, std_val_acc over the seeds that have a validation accuracy (0 / None), and
    n_train, mean_train_acc, std_train_acc, min_train_acc, mean_train_loss over those with a training accuracy;
    metric, the dataset's (paper.metric: "acc", "macro_f1" or "micro_f1"), and the same statistics of it, which the
    table shows: n_metric, mean_metric, std_metric, n_val_metric, mean_val_metric, std_val_metric, n_train_metric,
    mean_train_metric, std_train_metric, min_train_metric (for accuracy, equal to the accuracy's);
    groups: [] when every seed has the same settings; otherwise the seeds were run with different
    settings, nothing is averaged (the means are None) and groups holds one such summary per settings,
    each with `settings`, {name: value} of the settings that differ between the groups."""
    summaries = {}
    found = find_results(results_dir, datasets, seeds, pattern)
    # probe results are scored by accuracy (probe.py)
    metrics = dataset_metrics(results_dir, found) if pattern is RESULT_FILE else {}
    for key, by_seed in found.items():
        metric = metrics.get(key[0], "acc")
        groups = {}
        seeds = list(by_seed)
        for seed, settings in zip(seeds, _comparable([settings_of(by_seed[s]) for s in seeds])):
            same = json.dumps(settings, sort_keys=True, default=str)
            groups.setdefault(same, (settings, {}))[1][seed] = by_seed[seed]
        if len(groups) == 1:
            summaries[key] = {**_stats(by_seed, metric), "groups": []}
            continue
        all_settings = [settings for settings, _ in groups.values()]
        differing = sorted({k for st in all_settings for k in st
                            if any(other.get(k, MISSING) != st.get(k, MISSING) for other in all_settings)})
        parts = [{**_stats(runs, metric), "settings": {k: st.get(k, MISSING) for k in differing}}
                 for st, runs in groups.values()]
        parts.sort(key=lambda g: g["seeds"])
        counts = ("n", "n_val", "n_train", "n_metric", "n_val_metric", "n_train_metric")
        summaries[key] = {**{k: None for k in parts[0] if k != "settings"},  # no mean over mixed settings
                          **{k: sum(g[k] for g in parts) for k in counts},
                          "seeds": sorted(by_seed), "metric": metric, "groups": parts}
    return summaries


def settings_text(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


# ----------------------------------------------------------------------------- rows, columns, cells

def row_name(init: str) -> str:
    if init == INITIAL:
        return "Fine-tuning (initial model)"
    if m := FURTHER_PRETRAIN.match(init):
        return f"Further pre-training ({m.group(1)})"
    if m := SELF_DISTILL.match(init):
        return f"Self-distillation ({m.group(1)})"
    return init


def _row_order(init: str) -> tuple:
    if init == INITIAL:
        return (0, 0, "")
    for group, pattern in ((1, FURTHER_PRETRAIN), (2, SELF_DISTILL)):
        if m := pattern.match(init):
            return (group, int(m.group(1)), "")
    return (3, 0, init)


def _step_count(init: str) -> int | None:
    m = FURTHER_PRETRAIN.match(init) or SELF_DISTILL.match(init)
    return int(m.group(1)) if m else None


def _column_order(dataset: str) -> tuple:
    paper_order = PAPER_DATASETS + paper.PAPER_TEXT_DATASETS
    return (paper_order.index(dataset), "") if dataset in paper_order else (len(paper_order), dataset)


def column_metrics(summaries: dict, datasets: list[str]) -> dict[str, str]:
    """{dataset: the metric its column shows}: its results' (summarize), or by name for a column without results."""
    found = {d: s["metric"] for (d, _), s in summaries.items()}
    return {d: found.get(d) or paper.metric(d) for d in datasets}


def heading(what: str, datasets: list[str], metrics: dict[str, str]) -> tuple[str, list[str]]:
    """A table's title and its column headers: the metric in the title when the columns share it (`Test accuracy
    (%)`), else in each header (`chemprot (micro-F1)`) and the title names them all."""
    names = list(dict.fromkeys(paper.METRIC_NAMES[metrics[d]] for d in datasets)) or [paper.METRIC_NAMES["acc"]]
    if len(names) == 1:
        return f"{what} {names[0]} (%)", list(datasets)
    return (f"{what} {' / '.join(names)} (%), each column's metric in its header",
            [f"{d} ({paper.METRIC_NAMES[metrics[d]]})" for d in datasets])


def _best(summaries: dict, inits: list[str], dataset: str, mean_key: str, n_key: str) -> set[str]:
    """The inits with the highest mean in this column among its cells of at least MIN_SEEDS_FOR_BEST
    seeds (a mixed cell has no mean); none when fewer than two cells can compete."""
    means = {}
    for i in inits:
        s = summaries.get((dataset, i))
        if s is not None and s[mean_key] is not None and s[n_key] >= MIN_SEEDS_FOR_BEST:
            means[i] = s[mean_key]
    if len(means) < 2:
        return set()
    top = max(means.values())
    return {i for i, m in means.items() if m == top}


def cell(summary: dict | None, mean_key: str, std_key: str, n_key: str, note: int | None = None) -> str:
    if summary is not None and summary["groups"] and summary[n_key]:
        return f"mixed settings [{note}]"
    if summary is None or summary[mean_key] is None:
        return MISSING
    std = summary[std_key]
    text = f"{summary[mean_key]:.2f}" + (f" ± {std:.2f}" if std is not None else "")
    return f"{text} (n={summary[n_key]})"


def mixed_notes(summaries: dict, inits: list[str], datasets: list[str]) -> dict[tuple[str, str], int]:
    """{(dataset, init): note number} for the cells that mix settings, in table order."""
    keys = [(d, i) for i in inits for d in datasets if (d, i) in summaries and summaries[(d, i)]["groups"]]
    return {key: k for k, key in enumerate(keys, start=1)}


def markdown_table(summaries: dict, inits: list[str], datasets: list[str], mean_key: str, std_key: str,
                   n_key: str, notes: dict, bold: bool = True, name=row_name, headers=None) -> str:
    header = [""] + (headers or datasets)
    rows = []
    best = {d: _best(summaries, inits, d, mean_key, n_key) if bold else set() for d in datasets}
    for init in inits:
        cells = [name(init)]
        for d in datasets:
            text = cell(summaries.get((d, init)), mean_key, std_key, n_key, notes.get((d, init)))
            cells.append(f"**{text}**" if init in best[d] else text)
        rows.append(cells)
    widths = [max(len(r[c]) for r in [header] + rows) for c in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def uneven_seed_counts(summaries: dict, inits: list[str], datasets: list[str], n_key: str) -> list[str]:
    """`dataset (n=1, 3)` for each column whose cells average different numbers of seeds."""
    uneven = []
    for d in datasets:
        counts = sorted({summaries[(d, i)][n_key] for i in inits if (d, i) in summaries and summaries[(d, i)][n_key]})
        if len(counts) > 1:
            uneven.append(f"{d} (n={', '.join(map(str, counts))})")
    return uneven


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def csv_text(summaries: dict, inits: list[str], datasets: list[str], train: bool = False) -> str:
    """report.csv's content (with --train: the training-accuracy columns too)."""
    best = {d: _best(summaries, inits, d, "mean_metric", "n_metric") for d in datasets}
    best_val = {d: _best(summaries, inits, d, "mean_val_metric", "n_val_metric") for d in datasets}
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS + METRIC_CSV_COLUMNS + (TRAIN_CSV_COLUMNS + TRAIN_METRIC_CSV_COLUMNS if train
                                                            else ()))
        for init in inits:
            for d in datasets:
                s = summaries.get((d, init))
                if s is None:
                    continue
                for g in s["groups"] or [s]:
                    row = [init, row_name(init), d, g["n"], _number(g["mean_acc"]), _number(g["std_acc"]),
                           _number(g["mean_loss"]), int(init in best[d] and g is s), g["n_val"] or "",
                           _number(g["mean_val_acc"]), _number(g["std_val_acc"]),
                           int(init in best_val[d] and g is s) if g["n_val_metric"] else "",
                           settings_text(g.get("settings", {})), s["metric"], _number(g["mean_metric"]),
                           _number(g["std_metric"]), g["n_val_metric"] or "", _number(g["mean_val_metric"]),
                           _number(g["std_val_metric"])]
                    if train:
                        row += [g["n_train"] or "", _number(g["mean_train_acc"]), _number(g["std_train_acc"]),
                                _number(g["mean_train_loss"]), g["n_train_metric"] or "",
                                _number(g["mean_train_metric"]), _number(g["std_train_metric"])]
                    writer.writerow(row)
        return f.getvalue()


def one_line(dataset: str, init: str, s: dict, train: bool = False) -> str:
    """e.g. `cub self-further-pretrain-20000: test accuracy 85.21 ± 0.43 % over 5 seeds (1 2 3 4 5)`; the dataset's
    metric (`chemprot initial: test micro-F1 ...`)."""
    metric = paper.METRIC_NAMES[s["metric"]]
    spread = f" ± {s['std_metric']:.2f}" if s["std_metric"] is not None else ""
    seeds = " ".join(map(str, s["seeds"]))
    line = (f"{dataset} {init}: test {metric} {s['mean_metric']:.2f}{spread} % over {s['n_metric']} "
            f"seed{'s' if s['n_metric'] != 1 else ''} ({seeds})")
    if s["n_val_metric"]:
        val_spread = f" ± {s['std_val_metric']:.2f}" if s["std_val_metric"] is not None else ""
        line += f"; validation {metric} {s['mean_val_metric']:.2f}{val_spread} % (n={s['n_val_metric']})"
    if train and s["n_train_metric"]:
        train_spread = f" ± {s['std_train_metric']:.2f}" if s["std_train_metric"] is not None else ""
        line += (f"; training {metric} {s['mean_train_metric']:.2f}{train_spread} % (lowest "
                 f"{s['min_train_metric']:.2f}, n={s['n_train_metric']})")
    return line


# ----------------------------------------------------------------------------- probes

def probe_summaries(results_dir: str, datasets=None, seeds=None, steps=None) -> dict[str, dict]:
    """{protocol: {(dataset, init): summary}} of probe.py's results, as summarize() makes them: linear over the
    seeds (`seeds` only, if given), k-NN one run each; only the further pre-training / self-distillation inits of
    `steps` steps if given. Protocols without results are left out."""
    found = {}
    for protocol, pattern in PROBE_FILES.items():
        summaries = summarize(results_dir, datasets, seeds if protocol == "linear" else None, pattern)
        summaries = {(d, i): s for (d, i), s in summaries.items() if steps is None or _step_count(i) in (None, steps)}
        if summaries:
            found[protocol] = summaries
    return found


def probe_row_name(init: str) -> str:
    return "Initial model (θ₀)" if init == INITIAL else row_name(init)


def _knn_settings(results_dir: str, summaries: dict) -> str:
    """`k=20, T=0.07` (each value found) from the k-NN results of the table."""
    ks, temperatures = set(), set()
    for dataset, init in summaries:
        with open(os.path.join(results_dir, dataset, init, "probe-knn.json")) as f:
            result = json.load(f)
        ks.add(result.get("knn_k"))
        temperatures.add(result.get("knn_temperature"))
    shown = [", ".join(map(str, sorted(v for v in values if v is not None))) or "?" for values in (ks, temperatures)]
    return f"k={shown[0]}, T={shown[1]}"


def probe_sections(results_dir: str, probes: dict, datasets_asked, first_note: int) -> list[str]:
    """The markdown of the probe tables (a section per protocol with results) and their notes; mixed-settings
    notes are numbered from `first_note`."""
    sections = []
    for protocol, summaries in probes.items():
        datasets = sorted(set(datasets_asked or []) | {d for d, _ in summaries}, key=_column_order)
        inits = sorted({i for _, i in summaries}, key=_row_order)
        notes = {key: k + first_note - 1 for key, k in mixed_notes(summaries, inits, datasets).items()}
        first_note += len(notes)
        linear = protocol == "linear"
        sections += ["", f"## {PROBE_TITLES[protocol]}: test accuracy (%)", "",
                     markdown_table(summaries, inits, datasets, "mean_acc", "std_acc", "n", notes, bold=linear,
                                    name=probe_row_name), ""]
        if linear:
            sections.append("Frozen encoder, unmasked CLS features; BatchNorm without affine parameters and a linear "
                            "layer trained on them. Mean ± sample standard deviation over seeds (n); **bold**: best "
                            f"mean of the column among its cells of n >= {MIN_SEEDS_FOR_BEST} seeds.")
        else:
            sections.append(f"Weighted k-NN ({_knn_settings(results_dir, summaries)}) on the L2-normalised unmasked "
                            f"CLS features of the frozen encoder: one run per cell, no seed.")
        for (d, init), k in notes.items():
            groups = "; ".join(
                f"{settings_text(g['settings'])}: {cell({**g, 'groups': []}, 'mean_acc', 'std_acc', 'n')}"
                f", seeds {' '.join(map(str, g['seeds']))}" for g in summaries[(d, init)]["groups"])
            sections.append(f"[{k}] {d}, {probe_row_name(init)}: {groups}")
    return sections


def probe_csv_text(probes: dict) -> str:
    """probe.csv's content: one row per (protocol, init, dataset) with results (per settings group when mixed)."""
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PROBE_CSV_COLUMNS)
        for protocol, summaries in probes.items():
            datasets = sorted({d for d, _ in summaries}, key=_column_order)
            inits = sorted({i for _, i in summaries}, key=_row_order)
            best = {d: _best(summaries, inits, d, "mean_acc", "n") if protocol == "linear" else set()
                    for d in datasets}
            for init in inits:
                for d in datasets:
                    s = summaries.get((d, init))
                    for g in (s["groups"] or [s]) if s is not None else []:
                        writer.writerow([protocol, init, probe_row_name(init), d, g["n"], _number(g["mean_acc"]),
                                         _number(g["std_acc"]), _number(g["mean_loss"]),
                                         int(init in best[d] and g is s), settings_text(g.get("settings", {}))])
        return f.getvalue()


# ----------------------------------------------------------------------------- main

def main(args):
    summaries = summarize(args.results_dir, args.datasets, args.seeds)
    where = f"{args.results_dir}/<dataset>/<init>/seed<k>.json"
    if args.datasets:
        where += f" for {', '.join(args.datasets)}"
    if args.seeds:
        where += f" with seeds {' '.join(map(str, args.seeds))}"

    if args.init is not None:
        args.init = posixpath.normpath(args.init.replace(os.sep, "/"))  # `x/` names the folder x, as in finetune.py
        found = sorted((d for d, i in summaries if i == args.init), key=_column_order)
        if not found:
            raise utils.UserError(f"no results for init '{args.init}' in {where}")
        for d in found:
            s = summaries[(d, args.init)]
            missing = sorted(set(args.seeds or s["seeds"]) - set(s["seeds"]))
            if missing:
                raise utils.UserError(f"{d} {args.init}: no result for seed {' '.join(map(str, missing))} "
                                      f"(expected {args.results_dir}/{d}/{args.init}/seed{missing[0]}.json)")
            for g in s["groups"] or [s]:  # runs of different settings: one line each, never averaged
                name = f"{args.init} ({settings_text(g['settings'])})" if s["groups"] else args.init
                print(one_line(d, name, g, args.train))
        return

    if args.steps is not None:
        summaries = {(d, i): s for (d, i), s in summaries.items() if _step_count(i) in (None, args.steps)}
    probes = probe_summaries(args.results_dir, args.datasets, args.seeds, args.steps)
    if not summaries and probes:  # probes only: their tables alone
        text = "\n".join(probe_sections(args.results_dir, probes, args.datasets, 1)[1:]) + "\n"
        out_dir = outputs.make_dir(args.out_dir or args.results_dir, "--out_dir")
        outputs.write_together({os.path.join(out_dir, "report.md"): text,
                                os.path.join(out_dir, "probe.csv"): probe_csv_text(probes)}, "the report")
        print(text, end="")
        return
    if not summaries:
        steps = f" with {args.steps} steps" if args.steps is not None else ""
        raise utils.UserError(f"no fine-tuning results{steps} in {where} (run finetune.py first)")
    datasets = sorted(set(args.datasets or []) | {d for d, _ in summaries}, key=_column_order)
    inits = sorted({i for _, i in summaries}, key=_row_order)
    notes = mixed_notes(summaries, inits, datasets)

    metrics = column_metrics(summaries, datasets)

    def table(what, columns, key, **kw):  # the score of each column's metric: test, val_ or train_
        title, headers = heading(what, columns, metrics)
        return ["", f"## {title}", "", markdown_table(summaries, inits, columns, f"mean_{key}metric",
                                                      f"std_{key}metric", f"n_{key}metric", notes, headers=headers,
                                                      **kw)]
    sections = table("Test", datasets, "")[1:]
    val_datasets = [d for d in datasets if any(s["n_val_metric"] for (d2, _), s in summaries.items() if d2 == d)]
    if val_datasets:
        sections += table("Validation", val_datasets, "val_")
    train_datasets = [d for d in datasets if any(s["n_train_metric"] for (d2, _), s in summaries.items() if d2 == d)]
    if args.train and train_datasets:
        sections += table("Training", train_datasets, "train_", bold=False)
    elif args.train:
        sections += ["", "No training accuracy in these results (their records do not hold train_acc: run them "
                         "again with today's finetune.py to have it)."]
    sections += ["", "Mean ± sample standard deviation over fine-tuning seeds (n = number of seeds); "
                     f"**bold**: best mean of the column among its cells of n >= {MIN_SEEDS_FOR_BEST} seeds; "
                     f"{MISSING}: no results."]
    if set(metrics.values()) != {"acc"}:
        sections += ["", METRICS_NOTE]
    uneven = uneven_seed_counts(summaries, inits, datasets, "n_metric")
    if uneven:
        sections += ["", f"Different numbers of seeds within a column: {'; '.join(uneven)}."]
    if notes:
        sections += ["", "Mixed settings: these cells hold runs with different settings, not averaged:"]
        for (d, init), k in notes.items():
            groups = "; ".join(
                f"{settings_text(g['settings'])}: {cell({**g, 'groups': []}, 'mean_metric', 'std_metric', 'n_metric')}"
                f", seeds {' '.join(map(str, g['seeds']))}" for g in summaries[(d, init)]["groups"])
            sections.append(f"[{k}] {d}, {row_name(init)}: {groups}")
    sections += probe_sections(args.results_dir, probes, args.datasets, len(notes) + 1)
    text = "\n".join(sections) + "\n"

    out_dir = outputs.make_dir(args.out_dir or args.results_dir, "--out_dir")
    # all complete before any replaces an older report: a full disk leaves the old ones as they were
    files = {os.path.join(out_dir, "report.md"): text,
             os.path.join(out_dir, "report.csv"): csv_text(summaries, inits, datasets, args.train)}
    if probes:
        files[os.path.join(out_dir, "probe.csv")] = probe_csv_text(probes)
    outputs.write_together(files, "the report")
    print(text, end="")


if __name__ == "__main__":
    utils.run_cli(get_args_parser, main)
