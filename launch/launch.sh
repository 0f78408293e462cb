# Shared by the run_*.sh launchers (sourced, not run): $REPO_DIR, $PYTHON and `launcher NAME ARGS...`.
# $PYTHON runs the stages: set it, else the repository's .venv (made by `make`), else python3. It may be any
# command that takes a Python script's arguments (a wrapper, a container's python); the launcher itself
# (launch/: the standard library of Python 3.11+ only) runs on the .venv's python, else python3.

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LAUNCHER_PYTHON=python3
[ ! -x "$REPO_DIR/.venv/bin/python" ] || LAUNCHER_PYTHON="$REPO_DIR/.venv/bin/python"
PYTHON=${PYTHON:-$LAUNCHER_PYTHON}
export PYTHON

# launcher NAME ARGS...: the launcher NAME's Python side (launch/launchers.py) in place of this shell (same pid), so
# a signal to the launcher reaches it
launcher() {
  PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$LAUNCHER_PYTHON" -m launch "$@"
}
