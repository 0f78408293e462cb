"""The text datasets `python -m data.prepare` builds (format and rules: data/text.py), from their public files.

    python -m data.prepare chemprot --src ~/dont-stop-pretraining/data/chemprot
    python -m data.prepare twitter_emotion --src ~/tweeteval/datasets/emotion
    python -m data.prepare fortunes                       # Debian's fortunes package, fetched with apt-get
    python -m data.prepare text_csv --name reviews --train train.csv --test test.csv \\
        --text_column review --label_column stars

chemprot, citation_intent (ACL-ARC), sciie (SciERC)
                the allenai task files (Gururangan et al. 2020): --src holds train.jsonl, dev.jsonl, test.jsonl,
                one JSON object a line with `text` and a string `label` (other keys ignored). Lines whose text
                is empty are skipped, as their reader does, and counted. Label names sorted.
twitter_emotion TweetEval's `emotion` folder: {train,val,test}_text.txt (a tweet a line), {...}_labels.txt (its
                label number a line) and mapping.txt ('<number> <name>' lines, which give the names); val is dev.
fortunes        Debian's `fortunes` package (BSD licence, docs/data.md): the entries of the category files of
                FORTUNE_CATEGORIES, a category a label. Entries are separated by lines holding only '%';
                terminal overstrikes (x BACKSPACE y) resolved, other control characters dropped, whitespace
                collapsed; empty entries dropped; a text seen before (in file order, categories in label order)
                dropped, so no text has two labels; each category split with --seed, --test_fraction of it to
                test. --src: the unpacked package (or its usr/share/games/fortunes); default: `apt-get download`
                into --download_dir, unpacked there (data/sources.py's helpers).
text_csv, text_jsonl
                your own files: --train FILE --test FILE [--dev FILE], the text and label in the columns (CSV
                header) or keys (JSON lines) --text_column and --label_column. Needs --name. Label names sorted
                (numbers by value). An empty text is refused.
"""
import csv
import io
import json
import os
import random
import re

from data import sources
from data.datasets import DATASETS
from data.text import TEXT_DATASETS, Example, decode_utf8, normalised, write_dataset
from errors import UserError

FORTUNES_PACKAGE = "fortunes"
FORTUNES_DIR = os.path.join("usr", "share", "games", "fortunes")
FORTUNE_CATEGORIES = ["computers", "science", "politics", "law", "food", "songs-poems"]  # label order
ALLENAI_TASKS = ("chemprot", "citation_intent", "sciie")
USER_FORMATS = ("text_csv", "text_jsonl")
BUILDERS = (*ALLENAI_TASKS, "twitter_emotion", FORTUNES_PACKAGE, *USER_FORMATS)

OVERSTRIKE = re.compile(r"[^\x08]\x08")  # 'x BACKSPACE': the terminal printed the next character over x
CONTROL = re.compile(r"[\x00-\x08\x0b\x0e-\x1f\x7f]")  # not whitespace; BEL is in a few fortunes


def _read(path: str) -> str:
    if not os.path.isfile(path):
        raise UserError(f"missing {path}" if not os.path.lexists(path) else f"{path} is not a regular file")
    try:
        with open(path, "rb") as f:
            return decode_utf8(f.read(), path)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _lines(text: str) -> list[str]:
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


# ---------------------------------------------------------------- the allenai task files

def allenai(src: str) -> tuple[dict, dict]:
    """({split: [Example]}, {"skipped_empty": {split: n}}) of <src>/{train,dev,test}.jsonl (dev optional)."""
    splits, skipped = {}, {}
    for split in ("train", "dev", "test"):
        path = os.path.join(src, f"{split}.jsonl")
        if split == "dev" and not os.path.lexists(path):
            continue
        examples, skipped[split] = [], 0
        for number, line in enumerate(_lines(_read(path)), 1):
            if not line.strip():
                continue
            record = _json_object(line, path, number)
            label = record.get("label")
            if "text" not in record or not isinstance(label, str) or not label:
                raise UserError(f'{path}:{number}: expected "text" and a string "label" (the allenai task files), '
                                f"got keys {', '.join(record) or 'none'}")
            if not isinstance(record["text"], str) or not record["text"].strip():
                skipped[split] += 1  # their reader skips these
                continue
            examples.append(Example(record["text"], label, f"{path}:{number}"))
        splits[split] = examples
    return splits, {"skipped_empty": skipped}


def _json_object(line: str, path: str, number: int) -> dict:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise UserError(f"{path}:{number}: not a JSON object ({e})") from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{number}: not a JSON object (a {type(record).__name__})")
    return record


# ---------------------------------------------------------------- TweetEval's emotion

def _locate(src: str, marker: str, subdirs) -> str:
    """The folder under `src` holding `marker` (--src may be the folder itself or one above it)."""
    for sub in subdirs:
        if os.path.exists(os.path.join(src, sub, marker)):
            return os.path.normpath(os.path.join(src, sub))
    return src


def twitter_emotion(src: str) -> tuple[dict, dict]:
    root = _locate(src, "mapping.txt", [".", "emotion", os.path.join("datasets", "emotion"),
                                         os.path.join("tweeteval", "datasets", "emotion")])
    mapping_path = os.path.join(root, "mapping.txt")
    names = {}
    for number, line in enumerate(_lines(_read(mapping_path)), 1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        if len(fields) != 2 or not fields[0].isdigit():
            raise UserError(f"{mapping_path}:{number}: expected '<label number> <name>', got {line!r}")
        names[fields[0]] = fields[1].strip()
    splits = {}
    for split, part in (("train", "train"), ("dev", "val"), ("test", "test")):
        text_path, labels_path = os.path.join(root, f"{part}_text.txt"), os.path.join(root, f"{part}_labels.txt")
        texts, labels = _lines(_read(text_path)), _lines(_read(labels_path))
        if labels and not labels[-1].strip():  # a blank last line
            labels = labels[:-1]
        if len(texts) != len(labels):
            raise UserError(f"{text_path} has {len(texts)} lines but {labels_path} {len(labels)}: they must pair "
                            f"line by line")
        examples = []
        for number, (text, label) in enumerate(zip(texts, labels), 1):
            if label.strip() not in names:
                raise UserError(f"{labels_path}:{number}: label {label.strip()!r} is not in {mapping_path} "
                                f"({', '.join(names)})")
            examples.append(Example(text.strip(), names[label.strip()], f"{text_path}:{number}"))
        splits[split] = examples
    return splits, {"classes": [names[n] for n in sorted(names, key=int)]}


# ---------------------------------------------------------------- Debian's fortunes

def fortune_entries(path: str) -> list[tuple[int, str]]:
    """(number in the file, counted from 1, text normalised as the module docstring says) of each entry."""
    lines = _lines(_read(path))
    if lines and lines[-1].rstrip("\r") != "%":
        lines.append("%")  # the last entry of a file that does not end in '%'
    entries, current = [], []
    for line in lines:
        if line.rstrip("\r") != "%":
            current.append(line)
            continue
        text = "\n".join(current)
        while OVERSTRIKE.search(text):
            text = OVERSTRIKE.sub("", text)
        entries.append((len(entries) + 1, " ".join(CONTROL.sub("", text).split())))
        current = []
    return entries


def fortunes(folder: str, seed: int, test_fraction: float) -> tuple[dict, dict]:
    if not 0 < test_fraction < 1:
        raise UserError(f"--test_fraction must be between 0 and 1, got {test_fraction}")
    seen, splits = set(), {"train": [], "test": []}
    dropped = {"empty": {}, "repeated": {}}
    for category in FORTUNE_CATEGORIES:
        path = os.path.join(folder, category)
        kept, entries = [], fortune_entries(path)
        for number, text in entries:
            if text and normalised(text) not in seen:
                seen.add(normalised(text))
                kept.append(Example(text, category, f"{path}, entry {number}"))
        dropped["empty"][category] = sum(1 for _, text in entries if not text)
        dropped["repeated"][category] = len(entries) - len(kept) - dropped["empty"][category]
        # Seeded by category: a category's split does not change when others are added.
        order = list(range(len(kept)))
        random.Random(f"{seed}:{category}").shuffle(order)
        n_test = min(max(round(len(kept) * test_fraction), 1), len(kept) - 1) if len(kept) >= 2 else 0
        splits["test"] += [kept[i] for i in sorted(order[:n_test])]
        splits["train"] += [kept[i] for i in sorted(order[n_test:])]
    return splits, {"seed": seed, "test_fraction": test_fraction, "dropped": dropped}


def _fortunes_folder(src: str) -> str:
    folder = _locate(src, FORTUNE_CATEGORIES[0], [FORTUNES_DIR, os.path.join("share", "games", "fortunes"), "."])
    missing = [c for c in FORTUNE_CATEGORIES if not os.path.isfile(os.path.join(folder, c))]
    if missing:
        raise UserError(f"{src}: no fortune files {', '.join(missing)} (expected the unpacked fortunes package, "
                        f"with {FORTUNES_DIR}/, or that folder itself)")
    return folder


# ---------------------------------------------------------------- your own CSV or JSON lines

def user_file(path: str, fmt: str, text_column: str, label_column: str) -> list[Example]:
    content = _read(path)
    examples = []
    if fmt == "text_csv":
        reader = csv.DictReader(io.StringIO(content, newline=""))
        header = reader.fieldnames or []
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise UserError(f"{path}: the header ({', '.join(header) or 'empty'}) has no column "
                            f"{' or '.join(missing)}; name the columns with --text_column and --label_column")
        rows = ((reader.line_num, row) for row in reader)
    else:
        rows = ((n, _json_object(line, path, n)) for n, line in enumerate(_lines(content), 1) if line.strip())
    for number, row in rows:
        text, label = row.get(text_column), row.get(label_column)
        if fmt == "text_jsonl" and (text_column not in row or label_column not in row):
            raise UserError(f"{path}:{number}: no key {text_column if text_column not in row else label_column} "
                            f"(keys: {', '.join(row)}); name the keys with --text_column and --label_column")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        if not isinstance(text, str) or not isinstance(label, str) or not label.strip():
            raise UserError(f"{path}:{number}: expected a text and a label (a string or an integer), got "
                            f"{text_column}={text!r}, {label_column}={label!r}")
        examples.append(Example(text, label.strip(), f"{path}:{number}"))
    return examples


# ---------------------------------------------------------------- command line (data.prepare's)

def add_arguments(parser) -> None:
    g = parser.add_argument_group("text datasets (data/text_sources.py)")
    g.add_argument("--train", default=None, metavar="FILE", help="text_csv, text_jsonl: the training file")
    g.add_argument("--dev", default=None, metavar="FILE", help="text_csv, text_jsonl: a dev file (optional)")
    g.add_argument("--test", default=None, metavar="FILE", help="text_csv, text_jsonl: the test file")
    g.add_argument("--text_column", default="text",
                   help="text_csv, text_jsonl: the CSV column (header name) or JSON key of the text (default: text)")


def build(args) -> dict:
    """data.prepare's build for the names of BUILDERS."""
    user = args.dataset in USER_FORMATS
    if args.resize is not None or args.skip_bad:
        raise UserError(f"--resize and --skip_bad are for images, not the text dataset {args.dataset}")
    if not user and (args.train or args.dev or args.test):
        raise UserError(f"--train, --dev and --test are for text_csv and text_jsonl; {args.dataset} reads --src")
    if user and not args.name:
        raise UserError(f"{args.dataset} needs --name NAME (the folder it builds: <out>/NAME)")
    name = args.name or args.dataset
    if not name.replace("_", "").replace("-", "").replace(".", "").isalnum() or name.startswith("."):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-' and '.' (it names a folder)")
    if name in DATASETS or (name in TEXT_DATASETS and name != args.dataset):
        raise UserError(f"--name {name}: that is the name of another dataset; choose another")

    if user:
        if args.src is not None or not (args.train and args.test):
            raise UserError(f"{args.dataset} reads --train FILE and --test FILE (and --dev FILE if you have one), "
                            f"not --src")
        files = {split: path for split, path in (("train", args.train), ("dev", args.dev), ("test", args.test))
                 if path}
        splits = {split: user_file(path, args.dataset, args.text_column, args.label_column)
                  for split, path in files.items()}
        info = {"src": {split: os.path.abspath(path) for split, path in files.items()},
                "text_column": args.text_column, "label_column": args.label_column}
        return write_dataset(args, args.dataset, name, splits, info, list(files.values()))

    if args.src is not None and not os.path.isdir(args.src):
        raise UserError(f"--src {args.src} is not a folder")
    if args.dataset == FORTUNES_PACKAGE:
        if args.src is not None:
            folder, packages = _fortunes_folder(args.src), None
        else:
            download_dir = args.download_dir or os.path.join(args.out, ".downloads")
            fetched = sources.fetch_debian_packages([FORTUNES_PACKAGE], download_dir, FORTUNES_PACKAGE)
            folder = _fortunes_folder(fetched[0]["root"])
            packages = [{k: p[k] for k in ("package", "version", "deb")} for p in fetched]
        splits, info = fortunes(folder, args.seed, args.test_fraction)
        info.update(classes=FORTUNE_CATEGORIES, src=os.path.abspath(folder), packages=packages)
        return write_dataset(args, args.dataset, name, splits, info, [folder])
    if args.src is None:
        raise UserError(f"give the dataset's folder: python -m data.prepare {args.dataset} --src PATH")
    splits, info = (twitter_emotion if args.dataset == "twitter_emotion" else allenai)(args.src)
    info["src"] = os.path.abspath(args.src)
    return write_dataset(args, args.dataset, name, splits, info, [args.src])
