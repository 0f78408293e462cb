#!/usr/bin/env bash
# Stage 2, self-distillation:  bash run_selftrain.sh GPU DATASET [STEPS] [selftrain.py flags...]
#   STEPS: default 20000; the teacher is checkpoints/further-pretrain-STEPS/DATASET unless --teacher PATH
#   writes checkpoints/self-further-pretrain-STEPS/DATASET
# Example: bash run_selftrain.sh cpu digits 50 --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_selftrain.sh slurm DATASET [STEPS] [flags...]: one SLURM job (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_selftrain.sh "${@:2}"

launcher run_selftrain.sh "$@"
