#!/usr/bin/env bash
# Stage 1, further pre-training:  bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]
#   GPU: a CUDA device index, a comma list (one process per GPU, torchrun), or cpu
#   STEPS: default 20000; writes checkpoints/further-pretrain-STEPS/DATASET
# Example: bash run_pretrain.sh cpu digits 50 --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
USAGE="bash run_pretrain.sh GPU DATASET [STEPS] [pretrain.py flags...]"
source "$(dirname "$0")/scripts/launch.sh"

[ $# -ge 2 ] || usage_error "GPU and DATASET are required"
GPU=$1 DATASET=$2
shift 2
STEPS=20000
if [ $# -gt 0 ] && ! is_flag "$1"; then STEPS=$1; shift; fi

launch "$GPU" pretrain.py --dataset "$DATASET" --steps "$STEPS" "$@"
