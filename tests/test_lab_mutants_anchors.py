"""lab.mutants stays a working check as the code moves: every edit it makes still finds its text exactly once
(else `python -m lab.mutants` reports it "NOT APPLIED" and checks nothing), and applying one changes that file
only, in a copy, never the checkout."""
import os

import pytest

from lab import mutants

from helpers import REPO


@pytest.mark.parametrize("edit", mutants.EDITS, ids=lambda e: e.name)
def test_every_edit_finds_its_text_once(edit):
    with open(os.path.join(REPO, edit.path)) as f:
        assert f.read().count(edit.old) == 1, f"{edit.name}: the text to replace is not in {edit.path} once"
    assert edit.old != edit.new


def test_an_edit_changes_its_copy_only(tmp_path):
    edit = next(e for e in mutants.EDITS if e.old not in e.new)
    os.makedirs(tmp_path / os.path.dirname(edit.path), exist_ok=True)
    with open(os.path.join(REPO, edit.path)) as f:
        original = f.read()
    (tmp_path / edit.path).write_text(original)
    assert mutants.apply(str(tmp_path), edit) is None
    assert (tmp_path / edit.path).read_text() == original.replace(edit.old, edit.new) != original
    with open(os.path.join(REPO, edit.path)) as f:
        assert f.read() == original
    assert "occurs 0 times" in mutants.apply(str(tmp_path), edit)  # applied once, its text is gone
