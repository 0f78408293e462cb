"""`python -m data.prepare hf`: a dataset in one of the Hugging Face `datasets` forms, written in this project's own
form (<out>/<name>/{train,test}.lmdb + counts.json, docs/data.md), so that fingerprints, counts, --check and the
decode-once cache see one format whatever the source.

    python -m data.prepare hf --name beans --src AI-Lab-Makerere/beans                  # a Hub id (or its cache)
    python -m data.prepare hf --name mine --src ~/saved --label_column labels            # save_to_disk's folder
    python -m data.prepare hf --name mine --src ~/parquet_dir                            # train-*.parquet, test-*...
    python -m data.prepare hf --name mine --src ~/images                                 # {train,test}/<class>/

--src is read as: a folder written by save_to_disk (it holds dataset_dict.json), else a .parquet file or a folder
holding .parquet files (splits named by the files, as `datasets` names them: train-*.parquet, test-*.parquet, or
train/ and test/ folders), else a folder of images (`datasets`' imagefolder: train/<class>/<image> and
test/<class>/<image>), else a Hub id, loaded with `datasets.load_dataset` (with HF_HUB_OFFLINE=1 or
HF_DATASETS_OFFLINE=1, or when the Hub cannot be reached, from the local cache alone).

The images of --image_column are stored as the dataset holds them, byte for byte (a PNG or JPEG as encoded; a
`datasets` Image column holds the encoded file), or with --resize N as JPEG like the other converters; each is
decoded once while building. The labels of --label_column: a ClassLabel column keeps its label numbers and class
names; any other (integers, strings) is numbered in the sorted order of its distinct values over both splits, those
values becoming the class names. An image whose bytes are in both --train_split and --test_split is refused before
anything is written (a test image that is also a training image inflates the accuracy); the same bytes twice within a
split are a warning. `datasets` is needed only here: without it, one line says what to install.
"""
import contextlib
import hashlib
import importlib
import os
import sys
import tempfile
from typing import NamedTuple

from data.build import check_target, encode, records, remove, report, write_dataset
from data.datasets import DATASETS, SPLITS
import outputs
from errors import UserError

MISSING_PACKAGE = "python -m data.prepare hf needs the `datasets` package: pip install datasets"
MAX_LISTED = 5  # names in a line that lists the columns, splits or copies found


def add_arguments(parser) -> None:
    g = parser.add_argument_group("hf: a Hugging Face `datasets` source (data/hf.py)")
    g.add_argument("--image_column", default="image", help="hf: the column of images (default: image)")
    g.add_argument("--train_split", default="train", help="hf: the split written as train (default: train)")
    g.add_argument("--test_split", default="test", help="hf: the split written as test (default: test)")
    g.add_argument("--config", default=None, help="hf: a Hub dataset's configuration (subset) name")


def _datasets():
    """The `datasets` package, imported only when hf is used: the rest of the project runs without it."""
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise UserError(MISSING_PACKAGE) from None


# ---------------------------------------------------------------- the source

def source_kind(src: str) -> str:
    """save_to_disk, parquet, imagefolder or hub, as the module docstring says."""
    if os.path.isdir(src):
        if any(os.path.isfile(os.path.join(src, f)) for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
            return "save_to_disk"
        for _, _, files in os.walk(src):
            if any(f.endswith(".parquet") for f in files):
                return "parquet"
        return "imagefolder"
    if os.path.isfile(src):
        if src.endswith(".parquet"):
            return "parquet"
        raise UserError(f"--src {src} is a file but not a .parquet file; give a parquet file, a folder written by "
                        f"save_to_disk, a folder of images, or a Hub id")
    return "hub"


def _split_hint(kind: str) -> str:
    return {"parquet": "; `datasets` names a split after its files (train-*.parquet, test-*.parquet, or train/ and "
                       "test/ folders)",
            "imagefolder": "; give train/<class>/<image> and test/<class>/<image> (or use data.prepare imagefolder, "
                           "which can split one folder)",
            "save_to_disk": "; save a DatasetDict holding both splits"}.get(kind, "")


def load(src: str, kind: str, config, cache_dir: str) -> dict:
    """{split name: datasets.Dataset} of the source; a local source's files are cached under `cache_dir` (thrown
    away after the build), a Hub id's in the usual Hugging Face cache."""
    datasets = _datasets()
    if kind != "hub":  # a local copy into the cache is quick; the build shows its own progress
        datasets.disable_progress_bars()
    try:
        if kind == "save_to_disk":
            loaded = datasets.load_from_disk(src)
            if not isinstance(loaded, datasets.DatasetDict):
                raise UserError(f"{src} holds a single Dataset, without splits{_split_hint(kind)}")
            return dict(loaded)
        if kind == "parquet":
            files = {"data_files": src} if os.path.isfile(src) else {"data_dir": src}
            return dict(datasets.load_dataset("parquet", **files, cache_dir=cache_dir))
        if kind == "imagefolder":
            return dict(datasets.load_dataset("imagefolder", data_dir=src, cache_dir=cache_dir))
    except UserError:
        raise
    except Exception as e:  # a damaged arrow or parquet file, an empty folder, ...
        raise UserError(f"cannot read --src {src} as {kind}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    return _load_hub(datasets, src, config)


def _load_hub(datasets, name: str, config) -> dict:
    """A Hub dataset, from the cache alone when the Hub is offline or cannot be reached (asking an unreachable Hub
    retries for minutes); not cached then is one line saying how to get it."""
    from models.hub import _hub_offline_reason, looks_like_local_path  # the rule models follow
    if looks_like_local_path(name):
        raise UserError(f"--src {name} does not exist (a Hub id has the form owner/name)")
    offline = ("the Hub is offline here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)" if datasets.config.HF_HUB_OFFLINE
               else _hub_offline_reason())
    if offline is not None:
        import huggingface_hub.constants
        datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return dict(datasets.load_dataset(name, config))
    except Exception as e:  # ConnectionError, DatasetNotFoundError, FileNotFoundError, ValueError (a config), ...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        fetch = (f"on a machine with access run `python -c \"import datasets; datasets.load_dataset('{name}')"
                 f".save_to_disk('DIR')\"`, then pass --src DIR")
        if offline is not None:
            raise UserError(f"'{name}' is neither a local folder nor a Hub dataset in the local Hugging Face cache, "
                            f"and {offline}; {fetch}") from None
        raise UserError(f"cannot load the Hub dataset '{name}' ({reason}); {fetch}") from None


def _split(loaded: dict, split: str, flag: str, src: str, kind: str):
    if split not in loaded:
        raise UserError(f"{src} has no split '{split}' ({flag}); its splits: {', '.join(loaded) or 'none'}"
                        f"{_split_hint(kind)}")
    return loaded[split]


def _check_column(dataset, column: str, flag: str, src: str, split: str) -> None:
    if column not in dataset.column_names:
        raise UserError(f"{src} ({split}) has no column '{column}' ({flag}); its columns: "
                        f"{', '.join(dataset.column_names)}")


# ---------------------------------------------------------------- images and labels

class Row(NamedTuple):
    """An image of the source, named as its user finds it."""
    split: str
    index: int

    def __str__(self):
        return f"{self.split} row {self.index}"


def _image_column(datasets, dataset, column: str, src: str):
    """The dataset with `column` as undecoded images ({bytes, path}) or raw bytes: the files as stored, not
    re-encoded."""
    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    if getattr(feature, "dtype", None) in ("binary", "large_binary"):
        return dataset
    raise UserError(f"{src}: column '{column}' holds {feature!r}, not images (--image_column names the column of "
                    f"images)")


def _image_bytes(value) -> bytes:
    """An image cell: raw bytes, or the Image feature's {bytes, path} (a local imagefolder keeps the path only)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
        raise ValueError("empty image cell")
    if value is None:
        raise ValueError("empty image cell")
    return value


def _labels(datasets, splits: dict, column: str, src: str) -> tuple[dict, list]:
    """({split: labels}, class names): a ClassLabel's numbers and names, or other values numbered in sorted order."""
    features = {split: ds.features[column] for split, ds in splits.items()}
    values = {split: list(ds[column]) for split, ds in splits.items()}
    if all(isinstance(f, datasets.ClassLabel) for f in features.values()):
        classes = [str(n) for n in features["train"].names]
        if features["test"].names != features["train"].names:
            raise UserError(f"{src}: the ClassLabel of '{column}' names other classes in test than in train")
        for split, labels in values.items():
            bad = [label for label in labels if not 0 <= label < len(classes)]
            if bad:
                raise UserError(f"{src} {split}: {len(bad)} images have label {bad[0]}, outside 0..{len(classes) - 1} "
                                f"of its ClassLabel (-1: unlabelled, e.g. a challenge's hidden test set); use a split "
                                f"with labels")
        return values, classes
    kinds = {type(v).__name__ for labels in values.values() for v in labels}
    if kinds - {"int", "str"} or len(kinds) > 1:
        raise UserError(f"{src}: column '{column}' holds {', '.join(sorted(kinds))} values; labels must be all "
                        f"integers, all strings, or a ClassLabel (--label_column names the column of labels)")
    distinct = sorted({v for labels in values.values() for v in labels})
    number = {v: i for i, v in enumerate(distinct)}
    return {split: [number[v] for v in labels] for split, labels in values.items()}, [str(v) for v in distinct]


def _check_each_image_once(splits: dict, column: str, src: str) -> None:
    """Refuses an image whose bytes are in both splits (a test image that is also a training image inflates every
    accuracy measured on it); the same bytes twice within a split weigh an image twice but leak nothing: a warning."""
    first, across, within = {}, [], []
    for split, dataset in splits.items():
        for index, cell in enumerate(_cells(dataset, column)):
            try:
                digest = hashlib.sha256(_image_bytes(cell)).digest()
            except (OSError, ValueError):
                continue  # unreadable: the build names it (or --skip_bad skips it)
            row = Row(split, index)
            if digest in first:
                (across if first[digest].split != split else within).append((first[digest], row))
            else:
                first[digest] = row
    if within:
        print(f"warning: {src}: {len(within)} images repeat an image of their own split byte for byte (e.g. "
              f"{within[0][1]} = {within[0][0]}); they are kept", file=sys.stderr)
    if across:
        examples = ", ".join(f"{b} = {a}" for a, b in across[:MAX_LISTED])
        raise UserError(f"{src}: {len(across)} test images are training images, byte for byte (e.g. {examples}); "
                        f"each image must be in one split (a test image that is also a training image inflates the "
                        f"accuracy): nothing was written")


def _cells(dataset, column: str):
    for batch in dataset.select_columns([column]).iter(batch_size=256):
        yield from batch[column]


# ---------------------------------------------------------------- the build

def build(args) -> dict:
    if not args.name:
        raise UserError("hf needs --name NAME (the folder it builds: <out>/NAME)")
    name = args.name
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name.startswith("."):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    if args.src is None:
        raise UserError("give the dataset: python -m data.prepare hf --name NAME --src <Hub id | save_to_disk folder "
                        "| parquet file or folder | image folder>")
    if args.resize is not None and args.resize < 1:
        raise UserError(f"--resize must be a positive number of pixels, got {args.resize}")
    if args.train_split == args.test_split:
        raise UserError(f"--train_split and --test_split are both '{args.train_split}': a test split must hold other "
                        f"images than the training split")
    datasets = _datasets()
    kind = source_kind(args.src)
    target = os.path.join(args.out, name)
    check_target(target, args.src if kind != "hub" else args.out, args.overwrite)  # a Hub id is no folder to guard
    outputs.make_dir(args.out, "--out")
    try:
        cache_dir = tempfile.mkdtemp(prefix=f".{name}.partial-cache-", dir=args.out)
    except OSError as e:
        raise UserError(f"cannot write into --out {args.out}: {outputs.failure(e, args.out)}") from None
    try:
        summary = _convert(datasets, args, kind, target, cache_dir)
    finally:
        with contextlib.suppress(OSError):
            remove(cache_dir)
    report(name, target, summary["splits"], summary["classes"])
    return summary


def _convert(datasets, args, kind: str, target: str, cache_dir: str) -> dict:
    """The source's two splits checked and written to `target`; returns counts.json's content."""
    name = args.name
    loaded = load(args.src, kind, args.config, cache_dir)
    wanted = {"train": (args.train_split, "--train_split"), "test": (args.test_split, "--test_split")}
    splits = {split: _split(loaded, *wanted[split], args.src, kind) for split in SPLITS}
    for split, dataset in splits.items():
        for column, flag in ((args.image_column, "--image_column"), (args.label_column, "--label_column")):
            _check_column(dataset, column, flag, args.src, wanted[split][0])
    splits = {split: _image_column(datasets, ds, args.image_column, args.src) for split, ds in splits.items()}
    labels, classes = _labels(datasets, splits, args.label_column, args.src)
    if name in DATASETS and len(classes) > DATASETS[name]:
        raise UserError(f"{args.src} has {len(classes)} classes, but '{name}' models have {DATASETS[name]}; "
                        f"choose another --name")
    _check_each_image_once(splits, args.image_column, args.src)

    images = {split: dataset.select_columns([args.image_column]) for split, dataset in splits.items()}

    def load_row(row: Row):  # on data.build's threads: arrow tables are read-only, so safe to share
        try:
            return encode(_image_bytes(images[row.split][row.index][args.image_column]), args.resize), None
        except Exception as e:  # OSError, PIL's UnidentifiedImageError / DecompressionBombError, ...
            return None, f"{type(e).__name__}: {e}"

    written = {}
    for split in SPLITS:
        items, skipped = [(Row(split, i), label) for i, label in enumerate(labels[split])], []
        written[split] = (records(items, args, skipped, f"{name} {split}", load_row), skipped)
    summary = {"name": name, "dataset": "hf", "src": args.src if kind == "hub" else os.path.abspath(args.src),
               "source_kind": kind, "config": args.config, "splits_used": [args.train_split, args.test_split],
               "resize": args.resize, "expected": None}
    return write_dataset(args, name, target, written, classes, summary)
