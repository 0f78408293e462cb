#!/usr/bin/env bash
# The paper's claims at small scale, on CPU, about 50-90 minutes on 2 cores (SMALL_REPRODUCTION.md, protocol 2):
#   bash run_small_reproduction.sh [small_reproduction.py flags...]
# Writes runs/small_reproduction_protocol2/ (--out_dir); running it again continues where it stopped.
set -euo pipefail
USAGE="bash run_small_reproduction.sh [small_reproduction.py flags...]"
source "$(dirname "$0")/launch/launch.sh"  # $PYTHON and $REPO_DIR

cd "$REPO_DIR" && exec "$PYTHON" -m lab.small_reproduction "$@"  # exec: a signal to the launcher reaches the run
