"""Text datasets: each data.prepare text converter on files made here in exactly the public layouts (allenai task
files, TweetEval's emotion folder, Debian's fortunes package tree, a user's CSV / JSON lines), read back through
data.text's reader; the refusals (one line, exit 2); --check; the fingerprint; the real fortunes package if there,
built as `make fortunes` (make demo-text's data) builds it."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import REPO
from data import prepare
from data.identity import SplitInput
from data.text import TextSplit
from data.text_sources import FORTUNE_CATEGORIES
from helpers import assert_one_line, cli, cli_output


def run(*argv):
    return prepare.main(prepare.get_args_parser().parse_args([str(a) for a in argv]))


def write(path, content, mode="w"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, mode, **({} if "b" in mode else {"encoding": "utf-8", "newline": ""})) as f:
        f.write(content)
    return path


def jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records)


def read_split(out, name, split):
    s = TextSplit(name, split, str(out))
    return [(text, s.classes[label]) for text, label in s], s.classes


# ---------------------------------------------------------------- the allenai task files

ALLENAI = {  # split -> (text, label); the real files carry a `metadata` key too
    "train": [("Aspirin << inhibits >> [[ COX-1 ]] .", "INHIBITOR"), ("X binds Y.", "DOWNREGULATOR"),
              ("Z activates W.", "UPREGULATOR"), ("", "INHIBITOR"), ("Q blocks R.", "INHIBITOR")],
    "dev": [("M raises N.", "UPREGULATOR"), ("  ", "UPREGULATOR")],
    "test": [("P lowers O.", "DOWNREGULATOR"), ("A inhibits B.", "INHIBITOR")],
}


def fake_allenai(root, splits=ALLENAI):
    for split, items in splits.items():
        write(os.path.join(root, f"{split}.jsonl"),
              jsonl({"text": t, "label": label, "metadata": {"paper_id": i}} for i, (t, label) in enumerate(items)))
    return root


@pytest.mark.parametrize("task", ["chemprot", "citation_intent", "sciie"])
def test_allenai_task_files_give_each_split_its_texts_and_named_labels(tmp_path, capsys, task):
    run(task, "--src", fake_allenai(tmp_path / "src"), "--out", tmp_path / "data")
    classes = ["DOWNREGULATOR", "INHIBITOR", "UPREGULATOR"]  # sorted names
    for split, items in ALLENAI.items():
        got, names = read_split(tmp_path / "data", task, split)
        assert names == classes
        assert got == [(t, label) for t, label in items if t.strip()]  # empty texts skipped, the order kept
    counts = json.load(open(tmp_path / "data" / task / "counts.json"))
    assert counts["classes"] == classes and counts["num_classes"] == 3
    assert counts["splits"]["train"] == {"total": 4, "per_class": {"DOWNREGULATOR": 1, "INHIBITOR": 2,
                                                                  "UPREGULATOR": 1}, "skipped_empty": 1}
    assert counts["splits"]["dev"]["skipped_empty"] == 1 and counts["splits"]["test"]["skipped_empty"] == 0
    out = capsys.readouterr()
    assert f"{task} train: skipped 1 lines with empty text" in out.out
    assert f"warning: {task} train: expected" in out.err  # a fake copy: not the published size, not an error


def test_a_test_text_also_in_train_is_refused_naming_both_lines(tmp_path, monkeypatch, capsys):
    splits = {**ALLENAI, "test": [("P lowers O.", "DOWNREGULATOR"), ("q  BLOCKS r.", "INHIBITOR")]}
    src = fake_allenai(tmp_path / "src", splits)
    code, err = cli(prepare, ["chemprot", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "1 test texts are also training", f"{src}/test.jsonl:2 = {src}/train.jsonl:5")
    assert not os.path.exists(tmp_path / "data" / "chemprot")


# ---------------------------------------------------------------- TweetEval's emotion

def fake_tweeteval(root, texts=None):
    folder = os.path.join(root, "datasets", "emotion")
    # the label numbers name the labels in mapping.txt's order, which is not alphabetical here
    write(os.path.join(folder, "mapping.txt"), "0\tsadness\n1\tanger\n2\tjoy\n")
    texts = texts or {"train": ["so sad today ", "grr #angry", "yay!", "@user meh"], "val": ["blue monday"],
                      "test": ["furious.", "happy happy"]}
    labels = {"train": [0, 1, 2, 0], "val": [0], "test": [1, 2]}
    for part in texts:
        write(os.path.join(folder, f"{part}_text.txt"), "".join(t + "\n" for t in texts[part]))
        write(os.path.join(folder, f"{part}_labels.txt"), "".join(f"{n}\n" for n in labels[part]))
    return root


def test_twitter_emotion_reads_tweeteval_with_mapping_order_and_val_as_dev(tmp_path):
    run("twitter_emotion", "--src", fake_tweeteval(tmp_path / "tweeteval"), "--out", tmp_path / "data")
    train, classes = read_split(tmp_path / "data", "twitter_emotion", "train")
    assert classes == ["sadness", "anger", "joy"]
    assert train == [("so sad today", "sadness"), ("grr #angry", "anger"), ("yay!", "joy"), ("@user meh", "sadness")]
    assert read_split(tmp_path / "data", "twitter_emotion", "dev")[0] == [("blue monday", "sadness")]
    assert TextSplit("twitter_emotion", "test", str(tmp_path / "data")).labels == [1, 2]


def test_twitter_emotion_with_an_empty_tweet_is_one_line(tmp_path, monkeypatch, capsys):
    src = fake_tweeteval(tmp_path / "t", {"train": ["a", " ", "c", "d"], "val": ["e"], "test": ["f", "g"]})
    code, err = cli(prepare, ["twitter_emotion", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "empty text", "train_text.txt:2")


# ---------------------------------------------------------------- Debian's fortunes

FORTUNE_ENTRIES = {  # category -> entries as the files hold them
    "computers": ["Real programmers\n\tuse  ed.", "Calm down, it's *____\b\b\b\bonly* ones and zeroes.",
                  "Beware of bugs.", "  \n", "A program is never finished.", "Unix is simple.",
                  "The Internet is for\ncats."],
    "science": ["E = mc^2\x07", "Entropy always wins.", "Beware  of BUGS."],  # a computers text again: dropped
    "politics": ["Vote early.", "All politics is local."],
    "law": ["Ignorance of the law excuses no one.", "Possession is nine tenths."],
    "food": ["1893 The ideal brain tonic", "Eat your greens."],
    "songs-poems": ["Roses are red,\nviolets are blue.", "La la la.", "Twinkle twinkle."],
}


def fake_fortunes_package(root, extra=None):
    folder = os.path.join(root, "usr", "share", "games", "fortunes")
    for category, entries in {**FORTUNE_ENTRIES, **(extra or {})}.items():
        # the files separate entries by '%' lines; some end with one, some (computers) do not
        write(os.path.join(folder, category), "\n%\n".join(entries) + ("\n" if category == "computers" else "\n%\n"))
        write(os.path.join(folder, category + ".dat"), b"\x00\x02binary index", "wb")
    write(os.path.join(folder, "people"), "Not a chosen category.\n%\n")
    return root


def test_fortunes_from_a_package_tree_labels_categories_and_splits_each_with_the_seed(tmp_path, capsys):
    src = fake_fortunes_package(tmp_path / "pkg")
    run("fortunes", "--src", src, "--out", tmp_path / "a")
    splits = {s: read_split(tmp_path / "a", "fortunes", s)[0] for s in ("train", "test")}
    assert read_split(tmp_path / "a", "fortunes", "train")[1] == FORTUNE_CATEGORIES
    by_category = {c: sorted(t for s in splits.values() for t, label in s if label == c) for c in FORTUNE_CATEGORIES}
    assert by_category["computers"] == sorted(["Real programmers use ed.", "Calm down, it's *only* ones and zeroes.",
                                               "Beware of bugs.", "A program is never finished.", "Unix is simple.",
                                               "The Internet is for cats."])
    assert by_category["science"] == ["E = mc^2", "Entropy always wins."]  # the repeat of a computers text dropped
    assert "Not a chosen category." not in str(splits)
    # 20 % of each category to test (at least one, never all)
    sizes = {c: sum(label == c for _, label in splits["test"]) for c in FORTUNE_CATEGORIES}
    assert sizes == {"computers": 1, "science": 1, "politics": 1, "law": 1, "food": 1, "songs-poems": 1}
    counts = json.load(open(tmp_path / "a" / "fortunes" / "counts.json"))
    assert counts["splits"]["train"]["total"] == 11 and counts["splits"]["test"]["total"] == 6
    assert counts["dropped"] == {"empty": {**dict.fromkeys(FORTUNE_CATEGORIES, 0), "computers": 1},
                                 "repeated": {**dict.fromkeys(FORTUNE_CATEGORIES, 0), "science": 1}}
    # the same seed gives the same files; another seed another test split
    run("fortunes", "--src", src, "--out", tmp_path / "b")
    assert open(tmp_path / "a/fortunes/test.jsonl").read() == open(tmp_path / "b/fortunes/test.jsonl").read()
    big = {"computers": [f"Computer fact number {i}." for i in range(40)]}
    run("fortunes", "--src", fake_fortunes_package(tmp_path / "big", big), "--out", tmp_path / "c")
    run("fortunes", "--src", tmp_path / "big", "--out", tmp_path / "d", "--seed", 1)
    tests = [set(TextSplit("fortunes", "test", str(tmp_path / d)).texts) for d in ("c", "d")]
    assert len(tests[0]) == len(tests[1]) == 13 and tests[0] != tests[1]  # 8 of computers' 40 + 1 per other


def test_fortunes_without_its_categories_is_one_line(tmp_path, monkeypatch, capsys):
    src = fake_fortunes_package(tmp_path / "pkg")
    os.remove(os.path.join(src, "usr", "share", "games", "fortunes", "law"))
    code, err = cli(prepare, ["fortunes", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "no fortune files law", "unpacked fortunes package")


def _real_fortunes(tmp_path) -> str:
    """The unpacked package: under data/.downloads if a build left it there, else fetched now (skips without)."""
    downloads = os.path.join(REPO, "data", ".downloads")
    for entry in sorted(os.listdir(downloads)) if os.path.isdir(downloads) else []:
        if entry.startswith("fortunes_") and os.path.isdir(os.path.join(downloads, entry)):
            return os.path.join(downloads, entry)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        pytest.skip("no fortunes package in data/.downloads and no apt-get / dpkg-deb to fetch it")
    done = subprocess.run(["apt-get", "download", "fortunes"], cwd=tmp_path, capture_output=True, text=True)
    debs = [f for f in os.listdir(tmp_path) if f.endswith(".deb")]
    if done.returncode != 0 or not debs:
        pytest.skip(f"apt-get download fortunes failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    subprocess.run(["dpkg-deb", "-x", os.path.join(tmp_path, debs[0]), tmp_path / "pkg"], check=True)
    return str(tmp_path / "pkg")


def test_fortunes_from_the_real_package(tmp_path, capsys):
    src = _real_fortunes(tmp_path)
    assert "BSD" in open(os.path.join(src, "usr", "share", "doc", "fortunes", "copyright")).read()
    counts = run("fortunes", "--src", src, "--out", tmp_path / "data")["splits"]
    assert 3000 < counts["train"]["total"] + counts["test"]["total"] < 4000
    for category in FORTUNE_CATEGORIES:  # ~200 (food, law) to ~1,050 (computers) entries, a fifth to test
        n_train, n_test = (counts[s]["per_class"][category] for s in ("train", "test"))
        assert n_train + n_test > 150 and abs(n_test - 0.2 * (n_train + n_test)) <= 1, category
    food, _ = read_split(tmp_path / "data", "fortunes", "train")
    test, _ = read_split(tmp_path / "data", "fortunes", "test")
    assert any(t.startswith("1893 The ideal brain tonic 1900 Drink Coca-Cola") and label == "food"
               for t, label in food + test)
    assert all("\x08" not in t and "  " not in t and t == t.strip() for t, _ in food + test)
    run("--check", "fortunes", "--out", tmp_path / "data")
    assert "no test text is a training text" in capsys.readouterr().out


def test_make_fortunes_fetches_the_package_into_an_ignored_folder_and_builds_the_dataset_once(tmp_path):
    """`make fortunes` (what make demo-text builds first) as a user runs it, into a DATA_DIR made here: the .deb in
    <DATA_DIR>/.downloads/ (taken from a build's data/.downloads, else downloaded now: skips without network),
    unpacked there by data.prepare's fetch, the dataset built from it; a second make builds nothing; demo-text then
    goes straight to run_all.sh on it; git ignores the default download and dataset folders."""
    if not all(shutil.which(tool) for tool in ("make", "apt-get", "dpkg-deb")):
        pytest.skip("no make, apt-get or dpkg-deb")
    downloads = tmp_path / "data" / ".downloads"
    downloads.mkdir(parents=True)
    built = os.path.join(REPO, "data", ".downloads")
    debs = [f for f in os.listdir(built) if f.startswith("fortunes_") and f.endswith(".deb")] \
        if os.path.isdir(built) else []
    if debs:
        shutil.copy(os.path.join(built, debs[0]), downloads)
    else:
        done = subprocess.run(["apt-get", "download", "fortunes"], cwd=downloads, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"apt-get download fortunes failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")

    def make(*argv):  # -o: never (re)install the virtualenv from a test; PYTHON: this one
        return subprocess.run(["make", "--no-print-directory", "-o", ".venv/.installed", *argv,
                               f"DATA_DIR={tmp_path / 'data'}", f"PYTHON={sys.executable}"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
    first = make("-n", "demo-text").stdout.strip().splitlines()  # builds the dataset, then runs the routes
    assert len(first) == 2 and first[0].endswith(f"-m data.prepare fortunes --out {tmp_path / 'data'} --download_dir "
                                                 f"{downloads}") and "run_all.sh" in first[1], first
    done = make("fortunes")
    assert done.returncode == 0, done.stdout + done.stderr
    counts_path = tmp_path / "data" / "fortunes" / "counts.json"
    counts = json.load(open(counts_path))
    assert counts["classes"] == FORTUNE_CATEGORIES and counts["packages"][0]["package"] == "fortunes"
    assert 3000 < counts["splits"]["train"]["total"] + counts["splits"]["test"]["total"] < 4000
    unpacked = [d for d in os.listdir(downloads) if d.startswith("fortunes_") and os.path.isdir(downloads / d)]
    assert len(unpacked) == 1
    assert "BSD" in open(downloads / unpacked[0] / "usr" / "share" / "doc" / "fortunes" / "copyright").read()
    assert read_split(tmp_path / "data", "fortunes", "test")[1] == FORTUNE_CATEGORIES

    built_at = os.stat(counts_path).st_mtime_ns
    again = make("fortunes")
    assert again.returncode == 0 and "Nothing to be done" in again.stdout and \
        os.stat(counts_path).st_mtime_ns == built_at
    dry = make("-n", "demo-text").stdout.strip().splitlines()
    assert len(dry) == 1 and " bash run_all.sh cpu fortunes --model_name roberta-tiny " in dry[0] and \
        f"--data_dir {tmp_path / 'data'} " in dry[0], dry

    ignored = subprocess.run(["git", "check-ignore", "data/.downloads/x.deb", "data/fortunes/counts.json"],
                             cwd=REPO, capture_output=True, text=True)
    assert ignored.stdout.split() == ["data/.downloads/x.deb", "data/fortunes/counts.json"]


# ---------------------------------------------------------------- your own CSV or JSON lines

def test_text_csv_and_text_jsonl_read_the_named_columns(tmp_path):
    train = write(tmp_path / "train.csv", 'id,review,stars\n1,"Great, really",10\n2,Bad,2\n3,"two\nlines",2\n')
    test = write(tmp_path / "test.csv", "id,review,stars\r\n4,Fine,10\r\n")
    run("text_csv", "--name", "reviews", "--train", train, "--test", test, "--text_column", "review",
        "--label_column", "stars", "--out", tmp_path / "data")
    got, classes = read_split(tmp_path / "data", "reviews", "train")
    assert classes == ["2", "10"]  # numbers by value
    assert got == [("Great, really", "10"), ("Bad", "2"), ("two\nlines", "2")]
    assert read_split(tmp_path / "data", "reviews", "test")[0] == [("Fine", "10")]

    lines = jsonl([{"sentence": "good", "y": 1}, {"sentence": "bad", "y": 0}])
    run("text_jsonl", "--name", "mine", "--train", write(tmp_path / "tr.jsonl", lines), "--test",
        write(tmp_path / "te.jsonl", jsonl([{"sentence": "ok", "y": 1}])), "--dev",
        write(tmp_path / "dv.jsonl", jsonl([{"sentence": "meh", "y": 0}])),
        "--text_column", "sentence", "--label_column", "y", "--out", tmp_path / "data")
    assert TextSplit("mine", "train", str(tmp_path / "data")).labels == [1, 0]
    assert read_split(tmp_path / "data", "mine", "dev")[0] == [("meh", "0")]


@pytest.mark.parametrize("case, train, test, words", [
    ("empty text", "text,label\nhello,a\n ,b\n", "text,label\nhi,a\n", ["empty text", "train.csv:3"]),
    ("label not in train", "text,label\nhello,a\nbye,b\n", "text,label\nhi,c\n",
     ["test has labels the training split lacks", "test.csv:2 ('c')"]),
    ("not UTF-8", "text,label\nhello,a\n".encode() + "café,b\n".encode("latin-1"), "text,label\nhi,a\n",
     ["train.csv:3: not UTF-8", "byte 0xe9", "iconv"]),
    ("header without the columns", "sentence,label\nhello,a\n", "text,label\nhi,a\n",
     ["train.csv: the header (sentence, label) has no column text", "--text_column"]),
])
def test_bad_user_csv_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch, capsys, case, train, test, words):
    mode = "wb" if isinstance(train, bytes) else "w"
    argv = ["text_csv", "--name", "mine", "--train", write(tmp_path / "train.csv", train, mode),
            "--test", write(tmp_path / "test.csv", test), "--out", tmp_path / "data"]
    code, err = cli(prepare, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, *words)
    assert not os.path.exists(tmp_path / "data" / "mine")


def test_a_jsonl_line_without_the_named_key_is_one_line(tmp_path, monkeypatch, capsys):
    train = write(tmp_path / "tr.jsonl", jsonl([{"text": "a", "label": "x"}, {"body": "b", "label": "x"}]))
    argv = ["text_jsonl", "--name", "mine", "--train", train, "--test", train, "--out", tmp_path / "data"]
    code, err = cli(prepare, argv, monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "tr.jsonl:2: no key text", "--text_column")


# ---------------------------------------------------------------- overwrite, --check, fingerprints

def test_an_existing_dataset_is_kept_unless_overwrite_which_moves_it_aside(tmp_path, monkeypatch, capsys):
    src = fake_allenai(tmp_path / "src")
    run("sciie", "--src", src, "--out", tmp_path / "data")
    capsys.readouterr()
    code, err = cli(prepare, ["sciie", "--src", src, "--out", tmp_path / "data"], monkeypatch, capsys)
    assert code == 2
    assert_one_line(err, "already exists", "--overwrite")
    run("sciie", "--src", src, "--out", tmp_path / "data", "--overwrite")
    assert sorted(os.listdir(tmp_path / "data"))[1].startswith("sciie.old-")
    assert len(os.listdir(tmp_path / "data")) == 2  # no partial folder left


def test_check_passes_a_built_dataset_and_finds_a_leak_a_bad_label_and_changed_counts(tmp_path, monkeypatch,
                                                                                         capsys):
    run("chemprot", "--src", fake_allenai(tmp_path / "src"), "--out", tmp_path / "data")
    run("--check", "chemprot", "--out", tmp_path / "data")
    assert "ok, every line reads" in capsys.readouterr().out
    test = tmp_path / "data" / "chemprot" / "test.jsonl"
    original = test.read_text()
    for damage, words in ((original + jsonl([{"text": "x  BINDS y.", "label": 0}]), ["test texts are also training",
                                                                                     "train.jsonl:2"]),
                          (original.replace('"label": 0', '"label": 7'), ["label 7 outside 0..2"]),
                          (original.splitlines(keepends=True)[0], ["counts differ from counts.json"])):
        test.write_text(damage)
        code, _, err = cli_output(prepare, ["--check", "chemprot", "--out", tmp_path / "data"], monkeypatch, capsys)
        assert code == 2 and "problems found" in err.strip().splitlines()[-1], err
        assert all(w in err for w in words), (words, err)


def test_a_text_split_fingerprint_follows_its_content_not_its_json_spelling(tmp_path):
    run("citation_intent", "--src", fake_allenai(tmp_path / "src"), "--out", tmp_path / "data")
    path = tmp_path / "data" / "citation_intent" / "train.jsonl"
    before = SplitInput("citation_intent", "train", str(tmp_path / "data")).fingerprint()
    assert before["format"] == "jsonl" and before["records"] == 4
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({"label": r["label"], "text": r["text"]}, indent=None,
                                       separators=(" , ", " : ")) + "\n" for r in records))
    assert SplitInput("citation_intent", "train", str(tmp_path / "data")).fingerprint() == before
    records[0]["label"] = 2
    path.write_text(jsonl(records))
    assert SplitInput("citation_intent", "train", str(tmp_path / "data")).fingerprint()["sha256"] != before["sha256"]
