"""Every write path gets its one line: report.py's --out_dir, data.prepare's --out, tools.visualize's --out and a
--data_dir where digits is built on first use, each given as a file, read-only, or on a full filesystem. Each is
one `error: ...` line (exit 2), and nothing half-written is left (an older report stays as it was)."""
import json
import os
import shutil

import pytest

import report
from data.prepare import get_args_parser as prepare_parser
from data.prepare import main as prepare_main
from errors import UserError
from tools import visualize

from helpers import assert_one_line, cli, fill, open_tmp, small_filesystem, unprivileged, world_readable

CASES = ("a file", "read-only", "full")


def _results(root):
    for seed, acc in ((1, 0.5), (2, 0.7)):
        folder = os.path.join(root, "cub", "initial")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"seed{seed}.json"), "w") as f:
            json.dump({"test_acc": acc, "test_loss": 1.0, "args": {"seed": seed}}, f)


def _src(root):
    from PIL import Image
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            os.makedirs(os.path.join(root, split, cls), exist_ok=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 90, 9)).save(os.path.join(root, split, cls, f"{i}.png"))


def _files(path) -> dict:
    return {os.path.join(r, f): open(os.path.join(r, f), "rb").read() for r, _, fs in os.walk(path) for f in fs
            if f != "filler"}


# what each tool writes into `target` (a folder; for visualize the PNG's folder), as (module, argv) or a child's code
def _argv(tool, target, inputs):
    if tool == "report":
        return report, ["--results_dir", inputs, "--out_dir", target]
    if tool == "visualize":
        return visualize, ["--checkpoint", "vit-mae-tiny", "--dataset", "digits", "--data_dir", inputs,
                           "--num_images", 2, "--out", os.path.join(target, "recon.png")]
    if tool == "prepare":
        return None, ["imagefolder", "--src", inputs, "--name", "pets", "--out", target]
    return None, ["digits", target]  # the digits built on first use into --data_dir target


def _inputs(tool, tmp, data_dir):
    if tool == "report":
        _results(os.path.join(tmp, "results"))
        return os.path.join(tmp, "results")
    if tool == "visualize":
        shutil.copytree(os.path.join(data_dir, "digits"), os.path.join(tmp, "data", "digits"),
                        ignore=shutil.ignore_patterns(".cache"))
        return os.path.join(tmp, "data")
    if tool == "prepare":
        _src(os.path.join(tmp, "src"))
        return os.path.join(tmp, "src")
    return None


def _run_here(tool, argv, monkeypatch, capsys):
    """(exit code, stderr) of the tool run as its command line runs it."""
    module, args = argv
    if module is not None:
        return cli(module, args, monkeypatch, capsys)
    if tool == "prepare":
        try:
            prepare_main(prepare_parser().parse_args(list(map(str, args))))
            return 0, capsys.readouterr().err
        except UserError as e:
            capsys.readouterr()
            return 2, f"error: {e}\n"
    from data import ImageDataset
    try:
        ImageDataset("digits", "train", str(args[1]), 8)
        return 0, ""
    except UserError as e:
        return 2, f"error: {e}\n"


_CHILD = """
args = json.loads(sys.argv[1])
tool = args.pop(0)
try:
    if tool == "report":
        report.main(report.get_args_parser().parse_args(args))
    elif tool == "visualize":
        visualize.main(visualize.get_args_parser().parse_args(args))
    elif tool == "prepare":
        data.prepare.main(data.prepare.get_args_parser().parse_args(args))
    else:
        data.ImageDataset("digits", "train", args[1], 8)
    print("wrote")
except errors.UserError as e:
    print("error:", e)
"""


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("tool", ["report", "visualize", "prepare", "digits"])
def test_an_output_path_that_cannot_be_written_is_one_line(tool, case, data_dir, tmp_path, monkeypatch, capsys):
    with open_tmp() as tmp:
        inputs = _inputs(tool, tmp, data_dir)
        target = os.path.join(tmp, "out")
        if case == "a file":
            with open(target, "w") as f:
                f.write("a file where a folder should be\n")
            before = _files(tmp)
            code, err = _run_here(tool, _argv(tool, target, inputs), monkeypatch, capsys)
            assert code == 2
            assert_one_line(err, target)
        elif case == "read-only":
            os.makedirs(target)
            world_readable(tmp)
            os.chmod(target, 0o555)
            before = _files(tmp)
            _, args = _argv(tool, target, inputs)
            proc = unprivileged(_CHILD, json.dumps([tool, *map(str, args)]))
            assert proc.returncode == 0, proc.stderr[-3000:]
            out = proc.stdout.strip().splitlines()
            assert out[-1].startswith("error: ") and target in out[-1] and "ermission denied" in out[-1], out
        else:
            if tool == "prepare":  # the real write, past the check of the space it needs (tested apart)
                monkeypatch.setattr("data.prepare.check_space", lambda *a: None)
            with small_filesystem(target, 256 << 10):
                if tool == "report":  # an older report, which must survive intact
                    for name in ("report.md", "report.csv"):
                        with open(os.path.join(target, name), "w") as f:
                            f.write(f"the previous {name}\n")
                fill(target)
                before = _files(tmp)
                code, err = _run_here(tool, _argv(tool, target, inputs), monkeypatch, capsys)
                assert code == 2
                assert_one_line(err, target, "No space left")
                assert _files(tmp) == before  # nothing half-written, no temporary file, the old report kept
        if case != "full":
            assert _files(tmp) == before


def test_prepare_refuses_a_build_that_would_not_fit_before_starting(tmp_path, monkeypatch):
    import data.build
    _src(str(tmp_path / "src"))
    monkeypatch.setattr(data.build.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30,
                                                                                                1 << 20))
    with pytest.raises(UserError, match=r"would need about 0 MiB .* has 1 MiB free"):
        prepare_main(prepare_parser().parse_args(["imagefolder", "--src", str(tmp_path / "src"), "--name", "pets",
                                                  "--out", str(tmp_path / "out")]))
    assert os.listdir(tmp_path / "out") == []


def test_a_killed_digits_build_leaves_nothing_for_long(data_dir, tmp_path):
    """A build killed midway left its folder (.building-<pid>) for good, unless a later build had its pid."""
    import socket
    import subprocess
    import sys
    from data import ImageDataset
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = tmp_path / "digits"
    left = root / f".building.tmp{dead.pid}-{socket.gethostname()}"
    os.makedirs(left)
    (left / "train.lmdb.partial").write_bytes(b"\0" * 1000)
    shutil.copy(os.path.join(data_dir, "digits", "test.lmdb"), root / "test.lmdb")
    ImageDataset("digits", "train", str(tmp_path), 8)  # train.lmdb missing: built now
    assert sorted(os.listdir(root)) == ["test.lmdb", "train.lmdb"]
