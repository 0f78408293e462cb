#!/usr/bin/env bash
# Stage 1, further pre-training:  bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]
#   GPU: a CUDA device index, a comma list (one process per GPU, torchrun), or cpu
#   STEPS: default 20000; writes checkpoints/further-pretrain-STEPS/DATASET
# Example: bash run_pretrain.sh cpu digits 50 --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
USAGE="bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]"
source "$(dirname "$0")/scripts/launch.sh"

mae_stage pretrain.py "$@"
