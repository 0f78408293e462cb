"""Text datasets: one format on disk for every text classification set, its writer, its reader and its check.

    data/<name>/train.jsonl, test.jsonl [, dev.jsonl]    one JSON object a line: {"text": "...", "label": 3}
    data/<name>/counts.json                              the label names (`classes`, label i = classes[i]),
                                                         num_classes, the texts per split and label

Labels are stored as ints, their names in counts.json, as the image datasets keep theirs: a reader needs the
names file anyway (a label string in every line would still not say which labels a split lacks), and an int label
is what training uses. Texts are stored as the source gives them (the fortunes builder normalises whitespace).
`dev` exists where the source has one (the allenai tasks, TweetEval's val); the stages may use it or not.

Rules every writer keeps (data/text_sources.py's converters all go through `write_dataset`):
- no empty text (blank after stripping) in any split;
- every label of dev and test is a label of train (the classifier's labels are train's);
- no test text that is also a train or dev text, compared after normalising (NFKC, case folded, whitespace
  collapsed): such a test split measures memory, not generalisation. Refused naming the files and lines;
- the splits are written into a hidden folder and moved into place only once complete (data/build.py), so an
  existing dataset is replaced only with --overwrite, which moves it aside.
"""
import hashlib
import json
import os
import sys
import unicodedata
import uuid
from collections import Counter
from typing import NamedTuple

import outputs
from data.build import check_target, move_into_place, remove
from data.datasets import COUNTS_FILE, check_name, read_counts
from errors import UserError

TEXT_SPLITS = ("train", "dev", "test")  # dev is optional
REQUIRED_SPLITS = ("train", "test")
MAX_SHOWN = 3  # examples in a refusal or warning

# name -> (number of labels, {split: texts} of the published files); a build that differs warns, never fails
TEXT_DATASETS = {
    "chemprot": (13, {"train": 4169, "dev": 2427, "test": 3469}),
    "citation_intent": (6, {"train": 1688, "dev": 114, "test": 139}),
    "sciie": (7, {"train": 3219, "dev": 455, "test": 974}),
    "twitter_emotion": (4, {"train": 3257, "dev": 374, "test": 1421}),
    "fortunes": (6, None),  # counts depend on the package version and the seeded split
}


class Example(NamedTuple):
    text: str
    label: str  # the label's name; ints are given on writing
    where: str  # 'file:line' in the source, for messages


def normalised(text: str) -> str:
    """The form two texts are compared in: NFKC, case folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def split_path(root: str, split: str) -> str:
    return os.path.join(root, f"{split}.jsonl")


def is_text_dataset(root: str) -> bool:
    return os.path.isfile(split_path(root, "train"))


def dataset_modality(name: str, data_dir: str) -> str:
    """"text" for a text dataset (its train.jsonl is there, or it is not built yet and bears a text dataset's name),
    "image" otherwise."""
    root = os.path.join(data_dir, name)
    if is_text_dataset(root) or name in TEXT_DATASETS and not os.path.isdir(root):
        return "text"
    return "image"


def _examples(n: int, items) -> str:
    shown = "; ".join(items[:MAX_SHOWN])
    return shown + (f"; ... ({n} in all)" if n > MAX_SHOWN else "")


# ---------------------------------------------------------------- checks shared by the writer and --check

def leaks(splits: dict) -> list[tuple[str, str]]:
    """(where in train or dev, where in test) of each test text whose normalised form is a train or dev text."""
    seen = {}
    for split in ("train", "dev"):
        for text, where in splits.get(split, []):
            seen.setdefault(normalised(text), where)
    return [(seen[key], where) for text, where in splits.get("test", []) if (key := normalised(text)) in seen]


def repeats(splits: dict) -> dict:
    """{split: ['where = first where', ...]} of texts repeated within a split (a warning: weighted twice)."""
    found = {}
    for split, items in splits.items():
        first = {}
        for text, where in items:
            key = normalised(text)
            if key in first:
                found.setdefault(split, []).append(f"{where} = {first[key]}")
            else:
                first[key] = where
    return found


def count(labels, classes) -> dict:
    per_class = Counter(labels)
    return {"total": len(labels), "per_class": {name: per_class.get(i, 0) for i, name in enumerate(classes)}}


def print_counts(counts: dict, classes) -> None:
    """Texts per label and split, with the totals."""
    splits = [s for s in TEXT_SPLITS if s in counts]
    width = max([len(c) for c in classes] + [5])
    print(f"{'label':>5}  {'name':<{width}}  " + "  ".join(f"{s:>6}" for s in splits))
    for i, name in enumerate(classes):
        print(f"{i:>5}  {name:<{width}}  " + "  ".join(f"{counts[s]['per_class'][name]:>6}" for s in splits))
    print(f"{'':>5}  {'total':<{width}}  " + "  ".join(f"{counts[s]['total']:>6}" for s in splits))


def warn_expected(dataset: str, name: str, counts: dict, classes) -> None:
    """A warning on stderr where a published dataset's labels or split sizes differ from its files' (not an error:
    a partial or newer copy is legitimate)."""
    if dataset not in TEXT_DATASETS:
        return
    num_classes, sizes = TEXT_DATASETS[dataset]
    if len(classes) != num_classes:
        print(f"warning: {name}: {len(classes)} labels found, the published dataset has {num_classes}",
              file=sys.stderr)
    for split, expected in (sizes or {}).items():
        if split in counts and counts[split]["total"] != expected:
            print(f"warning: {name} {split}: expected {expected} texts (the published split), "
                  f"found {counts[split]['total']}", file=sys.stderr)


# ---------------------------------------------------------------- writing

def write_dataset(args, dataset: str, name: str, splits: dict, info: dict, inputs: list[str]) -> dict:
    """Writes <out>/<name>/{split}.jsonl + counts.json from {split: [Example]} (train and test; dev if given):
    checked (empty text, a dev/test label train lacks, a test text in train or dev), into a hidden folder,
    moved into place once complete. `inputs` are the files or folders read (the target may not hold them).
    The label names: info["classes"] where the source lists them (in its order), else train's labels sorted."""
    info, target = dict(info), os.path.join(args.out, name)
    for path in inputs:
        check_target(target, path, args.overwrite)
    empty = [e.where for items in splits.values() for e in items if not e.text.strip()]
    if empty:
        raise UserError(f"empty text at {_examples(len(empty), empty)}: every text must hold a word; "
                        f"remove those lines")
    in_train = {e.label for e in splits["train"]}
    classes = info.pop("classes", None) or _label_names(in_train)
    label_of = {label: i for i, label in enumerate(classes)}
    for split in ("dev", "test"):
        unknown = [f"{e.where} ({e.label!r})" for e in splits.get(split, []) if e.label not in in_train]
        if unknown:
            raise UserError(f"{split} has labels the training split lacks: {_examples(len(unknown), unknown)}; "
                            f"the classifier's labels are train's: add training examples of them or remove those "
                            f"lines")
    found = leaks({split: [(e.text, e.where) for e in items] for split, items in splits.items()})
    if found:
        shown = [f"{test} = {first}" for first, test in found]
        raise UserError(f"{len(found)} test texts are also training (or dev) texts after normalising whitespace and "
                        f"case: {_examples(len(found), shown)}; a test text seen in training inflates the score: "
                        f"remove them from one side; nothing was written")

    outputs.make_dir(args.out, "--out")
    partial = os.path.join(args.out, f".{name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(partial)
        counts = {}
        for split, items in splits.items():
            labels = [label_of[e.label] for e in items]
            with open(split_path(partial, split), "w", encoding="utf-8", newline="\n") as f:
                for e, label in zip(items, labels):
                    f.write(json.dumps({"text": e.text, "label": label}, ensure_ascii=False) + "\n")
            counts[split] = count(labels, classes)
            counts[split]["skipped_empty"] = info.get("skipped_empty", {}).get(split, 0)
        summary = {"name": name, "dataset": dataset, "format": "jsonl", "num_classes": len(classes),
                   "classes": classes, "splits": counts,
                   "expected": (TEXT_DATASETS.get(dataset) or (None, None))[1], **info}
        with open(os.path.join(partial, COUNTS_FILE), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=1, ensure_ascii=False)
        move_into_place(partial, target, args.overwrite)
    except OSError as e:  # a full disk, a read-only --out
        raise UserError(f"cannot write {target}: {outputs.failure(e, args.out)}; nothing was changed there") from None
    finally:
        remove(partial)

    split_names = [s for s in TEXT_SPLITS if s in counts]
    print(f"{name}: wrote " + ", ".join(f"{split_path(target, s)} ({counts[s]['total']} texts)" for s in split_names)
          + f", {len(classes)} labels")
    print_counts(counts, classes)
    print(f"counts and label names stored in {os.path.join(target, COUNTS_FILE)}")
    for split, skipped in info.get("skipped_empty", {}).items():
        if skipped:
            print(f"{name} {split}: skipped {skipped} lines with empty text (as the source's own reader does)")
    for split, found in repeats({s: [(e.text, e.where) for e in items] for s, items in splits.items()}).items():
        print(f"warning: {name} {split}: {len(found)} texts repeat within the split "
              f"({_examples(len(found), found)})", file=sys.stderr)
    warn_expected(dataset, name, counts, classes)
    return summary


def _label_names(labels: set) -> list[str]:
    """Sorted, numbers by value ('2' before '10'), so that labels given as numbers keep their numbers."""
    return sorted(labels, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


# ---------------------------------------------------------------- reading

def read_jsonl(path: str) -> list[tuple[str, int]]:
    """(text, label) of each line of a split file, checked: a damaged line is one error naming it."""
    with open(path, "rb") as f:
        data = f.read()
    text = decode_utf8(data, path)
    items = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:
            raise UserError(f"{path}:{number}: not a JSON object ({e})") from None
        if not (isinstance(record, dict) and isinstance(record.get("text"), str)
                and isinstance(record.get("label"), int) and not isinstance(record.get("label"), bool)):
            raise UserError(f'{path}:{number}: expected {{"text": string, "label": integer}}, got {line[:80]!r}')
        items.append((record["text"], record["label"]))
    return items


def decode_utf8(data: bytes, path: str) -> str:
    """`data` as UTF-8 (a leading byte-order mark dropped); other bytes are one error naming the line."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                        f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


class TextSplit:
    """One split of a text dataset: texts[i], labels[i] (0-based ints), the label names; item = (text, label)."""

    def __init__(self, name: str, split: str, data_dir: str):
        self.name, self.split = name, split
        self.root = os.path.join(data_dir, check_name(name))
        self.path = split_path(self.root, split)
        if not os.path.isdir(self.root):
            raise UserError(f"text dataset '{name}' not found: expected {self.path}; build it with "
                            f"`python -m data.prepare {name} --out {data_dir}` (see docs/data.md, Text datasets)")
        if not os.path.isfile(self.path):
            raise UserError(f"text dataset '{name}' has no {split} split: expected {self.path}")
        self.counts = read_counts(self.root, name, data_dir)
        if self.counts is None or self.counts.get("classes") is None:
            raise UserError(f"{os.path.join(self.root, COUNTS_FILE)} is missing or names no classes: the label "
                            f"names come from it; rebuild the dataset with `python -m data.prepare`")
        self.classes = self.counts["classes"]
        items = read_jsonl(self.path)
        if not items:
            raise UserError(f"text dataset '{name}' split '{split}' is empty ({self.path})")
        bad = [i for i, (_, label) in enumerate(items, 1) if not 0 <= label < len(self.classes)]
        if bad:
            raise UserError(f"{self.path}:{bad[0]}: label {items[bad[0] - 1][1]} outside 0..{len(self.classes) - 1} "
                            f"({len(bad)} such lines); rebuild the dataset with `python -m data.prepare`")
        self.texts = [text for text, _ in items]
        self.labels = [label for _, label in items]

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, index):
        return self.texts[index], self.labels[index]

    def num_classes(self) -> int:
        return len(self.classes)


def fingerprint(split: TextSplit) -> dict:
    """The content fingerprint of a text split: the label names, then each (text, label) in file order; the
    file's JSON spelling (spaces, key order, escapes) does not enter, any changed text or label does."""
    h = hashlib.sha256(b"text jsonl\n")
    for blob in [name.encode() for name in split.classes] + [b"\x00records\x00"]:
        h.update(len(blob).to_bytes(8, "little") + blob)
    for text, label in zip(split.texts, split.labels):
        blob = text.encode()
        h.update(len(blob).to_bytes(8, "little") + blob + int(label).to_bytes(8, "little", signed=True))
    return {"format": "jsonl", "records": len(split), "sha256": h.hexdigest()}


# ---------------------------------------------------------------- python -m data.prepare --check NAME

def check(args) -> dict:
    """Every split read back: lines valid, no empty text, labels in range, counts as counts.json says, no test
    text in train or dev; repeats within a split warned."""
    name = check_name(args.check, "--check", "--out")
    root = os.path.join(args.out, name)
    stored = read_counts(root, name, args.out)
    problems, splits, counts = [], {}, {}
    if stored is None or stored.get("classes") is None:
        raise UserError(f"{os.path.join(root, COUNTS_FILE)} is missing or names no classes (the label names); "
                        f"rebuild it with `python -m data.prepare`")
    classes = stored["classes"]
    for split in TEXT_SPLITS:
        path = split_path(root, split)
        if not os.path.isfile(path):
            if split in REQUIRED_SPLITS:
                problems.append(f"missing {path}")
            continue
        try:
            items = read_jsonl(path)
        except UserError as e:
            problems.append(str(e))
            continue
        for number, (text, label) in enumerate(items, 1):
            if not text.strip():
                problems.append(f"{path}:{number}: empty text")
            if not 0 <= label < len(classes):
                problems.append(f"{path}:{number}: label {label} outside 0..{len(classes) - 1}")
        splits[split] = [(text, f"{path}:{n}") for n, (text, _) in enumerate(items, 1)]
        counts[split] = count([label for _, label in items], classes)
        want = (stored.get("splits") or {}).get(split) or {}
        if (want.get("total"), want.get("per_class")) != (counts[split]["total"], counts[split]["per_class"]):
            problems.append(f"{path}: counts differ from counts.json ({counts[split]['total']} texts, counts.json "
                            f"says {want.get('total')})")
    found = leaks(splits)
    if found:
        shown = [f"{test} = {first}" for first, test in found]
        problems.insert(0, f"{len(found)} test texts are also training (or dev) texts: "
                           f"{_examples(len(found), shown)}")
    print_counts(counts, classes)
    warn_expected(stored.get("dataset", name), name, counts, classes)
    for split, repeated in repeats(splits).items():
        print(f"warning: {root} {split}: {len(repeated)} texts repeat within the split "
              f"({_examples(len(repeated), repeated)})", file=sys.stderr)
    if problems:
        for problem in problems[:20]:
            print(problem, file=sys.stderr)
        raise UserError(f"{root}: {len(problems)} problems found; rebuild it with "
                        f"`python -m data.prepare ... --overwrite`")
    print(f"{root}: ok, every line reads, no empty text, labels in 0..{len(classes) - 1}, "
          f"no test text is a training text")
    return counts
