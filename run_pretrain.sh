#!/usr/bin/env bash
# Stage 1, further pre-training:  bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]
#   GPU: a CUDA device index, a comma list (one process per GPU, torchrun), or cpu
#   STEPS: default 20000; writes checkpoints/further-pretrain-STEPS/DATASET
# Example: bash run_pretrain.sh cpu digits 50 --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_pretrain.sh slurm DATASET [STEPS] [flags...]: one SLURM job (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_pretrain.sh "${@:2}"

launcher run_pretrain.sh "$@"
