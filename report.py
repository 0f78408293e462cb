"""The paper's results table: test accuracy, mean ± std over the fine-tuning seeds, per (init, dataset).

Reads the result files that finetune.py writes, `<results_dir>/<dataset>/<init>/seed<k>.json`
(only those: the per-run folders `seed<k>/` are skipped), where <init> is `initial` (fine-tuned from
θ₀), `further-pretrain-<steps>`, `self-further-pretrain-<steps>`, or any other checkpoint name.

    python report.py                                   # results/report.md, results/report.csv; prints the table
    python report.py --datasets cub dtd --steps 20000
    python report.py --datasets cub --init self-further-pretrain-20000   # one line: mean ± std of its seeds
    python report.py --datasets cub --init initial --seeds 1 2 3         # ... of these seeds (run_finetune.sh)

The table. Rows: "Fine-tuning (initial model)", "Further pre-training (<steps>)",
"Self-distillation (<steps>)" (steps ascending within each), then other checkpoints by name.
Columns: the paper's six datasets in its order (aircraft, chest_xray, cub, dtd, stanford_dogs,
vgg_flower_102), then other datasets alphabetically. A cell is the test accuracy in percent,
`mean ± std (n=seeds)` with the sample standard deviation (ddof=1), or `mean (n=1)` for one seed;
`—` where there are no results (never 0). If some results carry a validation accuracy
(finetune.py --val_split), a second table shows it the same way, for those datasets. With --train, one more
table shows the accuracy on the training images (train_acc: eval mode, after the last step, without the
--val_split part) the same way, without bold, for the results that have it (a result whose record does not hold
it has None: training/record.py), and the --init line adds it.

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
init,row_name,dataset,n,mean_acc,std_acc,mean_loss,best,n_val,mean_val_acc,std_val_acc,best_val,settings;
accuracies in percent, mean_loss the mean test cross-entropy, best / best_val 1 for the bold cells
(else 0), std empty for a single seed, the val columns empty without validation results, settings the
group's differing settings (`lr=0.001 steps=5000`) for a mixed cell, else empty. With --train, four more
columns: n_train,mean_train_acc,std_train_acc,mean_train_loss (empty without training results).

Probes (probe.py), only when there are any: `<results_dir>/<dataset>/<init>/probe-linear-seed<k>.json` and
`probe-knn.json`, which the fine-tuning table never reads (its files are seed<k>.json). Below the fine-tuning tables,
a "Linear probe" table (mean ± std over seeds, as above, --seeds applies) and a "k-NN" table (one run per cell, no
seed, never bold), with the same rows (the initial model's row named "Initial model (θ₀)") and columns, --steps
applied, settings compared as above. Their numbers go to probe.csv beside report.csv, columns
protocol,init,row_name,dataset,n,mean_acc,std_acc,mean_loss,best,settings (protocol: linear or knn). With only
probe results, report.md holds the probe tables alone and report.csv is not written. --init shows fine-tuning only.
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
CSV_COLUMNS = ("init", "row_name", "dataset", "n", "mean_acc", "std_acc", "mean_loss", "best",
               "n_val", "mean_val_acc", "std_val_acc", "best_val", "settings")
TRAIN_CSV_COLUMNS = ("n_train", "mean_train_acc", "std_train_acc", "mean_train_loss")  # with --train
# Recorded arguments that do not change a run's result (utils.RESULT_NEUTRAL_FLAGS, the list resume uses too),
# those implied by the cell (dataset, init) and the paths the inputs were read from: runs differing only in these
# are averaged together.
NOT_SETTINGS = utils.RESULT_NEUTRAL_FLAGS | {"seed", "dataset", "scratch", "ckpt_name", "data_dir", "checkpoint_dir"}
NUMERICS = ("precision", "device_type")  # as each start ran: they change the numbers
MIN_SEEDS_FOR_BEST = 2


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
    for key in ["test_acc"] + [k for k in ("val_acc", "train_acc") if result.get(k) is not None]:
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


def _stats(by_seed: dict[int, dict]) -> dict:
    results = list(by_seed.values())
    acc = [100.0 * r["test_acc"] for r in results]
    losses = [r["test_loss"] for r in results if isinstance(r.get("test_loss"), (int, float))]
    val = [100.0 * r["val_acc"] for r in results if r.get("val_acc") is not None]
    train = [100.0 * r["train_acc"] for r in results if r.get("train_acc") is not None]
    train_losses = [r["train_loss"] for r in results if isinstance(r.get("train_loss"), (int, float))]
    mean_acc, std_acc = _mean_std(acc)
    mean_val, std_val = _mean_std(val)
    mean_train, std_train = _mean_std(train)
    return {"seeds": sorted(by_seed), "n": len(acc), "mean_acc": mean_acc, "std_acc": std_acc,
            "mean_loss": statistics.fmean(losses) if losses else None,
            "n_val": len(val), "mean_val_acc": mean_val, "std_val_acc": std_val,
            "n_train": len(train), "mean_train_acc": mean_train, "std_train_acc": std_train,
            "min_train_acc": min(train) if train else None,
            "mean_train_loss": statistics.fmean(train_losses) if train_losses else None}


def summarize(results_dir: str, datasets=None, seeds=None, pattern=RESULT_FILE) -> dict[tuple[str, str], dict]:
    """{(dataset, init): summary} over the seeds of each (or those of `seeds` only); accuracies in percent.

    summary: seeds (sorted list), n, mean_acc, std_acc (sample std; None for one seed), mean_loss,
    and n_val, mean_val_acc, std_val_acc over the seeds that have a validation accuracy (0 / None), and
    n_train, mean_train_acc, std_train_acc, min_train_acc, mean_train_loss over those with a training accuracy;
    groups: [] when every seed has the same settings; otherwise the seeds were run with different
    settings, nothing is averaged (the means are None) and groups holds one such summary per settings,
    each with `settings`, {name: value} of the settings that differ between the groups."""
    summaries = {}
    for key, by_seed in find_results(results_dir, datasets, seeds, pattern).items():
        groups = {}
        seeds = list(by_seed)
        for seed, settings in zip(seeds, _comparable([settings_of(by_seed[s]) for s in seeds])):
            same = json.dumps(settings, sort_keys=True, default=str)
            groups.setdefault(same, (settings, {}))[1][seed] = by_seed[seed]
        if len(groups) == 1:
            summaries[key] = {**_stats(by_seed), "groups": []}
            continue
        all_settings = [settings for settings, _ in groups.values()]
        differing = sorted({k for st in all_settings for k in st
                            if any(other.get(k, MISSING) != st.get(k, MISSING) for other in all_settings)})
        parts = [{**_stats(runs), "settings": {k: st.get(k, MISSING) for k in differing}}
                 for st, runs in groups.values()]
        parts.sort(key=lambda g: g["seeds"])
        summaries[key] = {"seeds": sorted(by_seed), "n": len(by_seed), "mean_acc": None, "std_acc": None,
                          "mean_loss": None, "n_val": sum(g["n_val"] for g in parts), "mean_val_acc": None,
                          "std_val_acc": None, "n_train": sum(g["n_train"] for g in parts), "mean_train_acc": None,
                          "std_train_acc": None, "min_train_acc": None, "mean_train_loss": None, "groups": parts}
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
    return (PAPER_DATASETS.index(dataset), "") if dataset in PAPER_DATASETS else (len(PAPER_DATASETS), dataset)


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
                   n_key: str, notes: dict, bold: bool = True, name=row_name) -> str:
    header = [""] + datasets
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
    best = {d: _best(summaries, inits, d, "mean_acc", "n") for d in datasets}
    best_val = {d: _best(summaries, inits, d, "mean_val_acc", "n_val") for d in datasets}
    with io.StringIO(newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS + (TRAIN_CSV_COLUMNS if train else ()))
        for init in inits:
            for d in datasets:
                s = summaries.get((d, init))
                if s is None:
                    continue
                for g in s["groups"] or [s]:
                    row = [init, row_name(init), d, g["n"], _number(g["mean_acc"]), _number(g["std_acc"]),
                           _number(g["mean_loss"]), int(init in best[d] and g is s), g["n_val"] or "",
                           _number(g["mean_val_acc"]), _number(g["std_val_acc"]),
                           int(init in best_val[d] and g is s) if g["n_val"] else "",
                           settings_text(g.get("settings", {}))]
                    if train:
                        row += [g["n_train"] or "", _number(g["mean_train_acc"]), _number(g["std_train_acc"]),
                                _number(g["mean_train_loss"])]
                    writer.writerow(row)
        return f.getvalue()


def one_line(dataset: str, init: str, s: dict, train: bool = False) -> str:
    """e.g. `cub self-further-pretrain-20000: test accuracy 85.21 ± 0.43 % over 5 seeds (1 2 3 4 5)`"""
    spread = f" ± {s['std_acc']:.2f}" if s["std_acc"] is not None else ""
    seeds = " ".join(map(str, s["seeds"]))
    line = (f"{dataset} {init}: test accuracy {s['mean_acc']:.2f}{spread} % over {s['n']} "
            f"seed{'s' if s['n'] != 1 else ''} ({seeds})")
    if s["n_val"]:
        val_spread = f" ± {s['std_val_acc']:.2f}" if s["std_val_acc"] is not None else ""
        line += f"; validation accuracy {s['mean_val_acc']:.2f}{val_spread} % (n={s['n_val']})"
    if train and s["n_train"]:
        train_spread = f" ± {s['std_train_acc']:.2f}" if s["std_train_acc"] is not None else ""
        line += (f"; training accuracy {s['mean_train_acc']:.2f}{train_spread} % (lowest {s['min_train_acc']:.2f}, "
                 f"n={s['n_train']})")
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

    sections = ["## Test accuracy (%)", "",
                markdown_table(summaries, inits, datasets, "mean_acc", "std_acc", "n", notes)]
    val_datasets = [d for d in datasets if any(s["n_val"] for (d2, _), s in summaries.items() if d2 == d)]
    if val_datasets:
        sections += ["", "## Validation accuracy (%)", "",
                     markdown_table(summaries, inits, val_datasets, "mean_val_acc", "std_val_acc", "n_val", notes)]
    train_datasets = [d for d in datasets if any(s["n_train"] for (d2, _), s in summaries.items() if d2 == d)]
    if args.train and train_datasets:
        sections += ["", "## Training accuracy (%)", "",
                     markdown_table(summaries, inits, train_datasets, "mean_train_acc", "std_train_acc", "n_train",
                                    notes, bold=False)]
    elif args.train:
        sections += ["", "No training accuracy in these results (their records do not hold train_acc: run them "
                         "again with today's finetune.py to have it)."]
    sections += ["", "Mean ± sample standard deviation over fine-tuning seeds (n = number of seeds); "
                     f"**bold**: best mean of the column among its cells of n >= {MIN_SEEDS_FOR_BEST} seeds; "
                     f"{MISSING}: no results."]
    uneven = uneven_seed_counts(summaries, inits, datasets, "n")
    if uneven:
        sections += ["", f"Different numbers of seeds within a column: {'; '.join(uneven)}."]
    if notes:
        sections += ["", "Mixed settings: these cells hold runs with different settings, not averaged:"]
        for (d, init), k in notes.items():
            groups = "; ".join(
                f"{settings_text(g['settings'])}: {cell({**g, 'groups': []}, 'mean_acc', 'std_acc', 'n')}"
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
