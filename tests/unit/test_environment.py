"""The environment that does not rot: constraints.txt pins, with ==, every package requirements.txt names, and
`make` installs requirements.txt under it unless CONSTRAINTS is emptied (README, "Quickstart")."""
import os
import re

from helpers import REPO


def _names(path: str, pinned: bool) -> dict[str, str]:
    """{normalised package name: version or requirement} of a requirements-style file."""
    out = {}
    with open(os.path.join(REPO, path)) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            m = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line)
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[name] = m.group(2).removeprefix("==") if pinned else m.group(2)
    return out


def test_constraints_pin_every_requirement_exactly():
    pins = _names("constraints.txt", pinned=True)
    with open(os.path.join(REPO, "constraints.txt")) as f:
        entries = [line for line in f if line.strip() and not line.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[^=\s]+\n?", e) for e in entries), "every line NAME==VERSION"
    missing = sorted(set(_names("requirements.txt", pinned=False)) - set(pins))
    assert missing == [], f"requirements without a pin in constraints.txt: {missing} (run make constraints)"


def test_make_installs_under_the_constraints_by_default():
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, flags=re.M)
    assert "-r requirements.txt $(if $(CONSTRAINTS),-c $(CONSTRAINTS))" in makefile
