#!/usr/bin/env bash
# Stage 2, self-distillation:  bash run_selftrain.sh GPU DATASET [STEPS] [selftrain.py flags...]
#   STEPS: default 20000; the teacher is checkpoints/further-pretrain-STEPS/DATASET unless --teacher PATH
#   writes checkpoints/self-further-pretrain-STEPS/DATASET
# Example: bash run_selftrain.sh cpu digits 50 --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
USAGE="bash run_selftrain.sh GPU DATASET [STEPS] [selftrain.py flags...]"
source "$(dirname "$0")/scripts/launch.sh"

[ $# -ge 2 ] || usage_error "GPU and DATASET are required"
GPU=$1 DATASET=$2
shift 2
STEPS=20000
if [ $# -gt 0 ] && ! is_flag "$1"; then STEPS=$1; shift; fi

launch "$GPU" selftrain.py --dataset "$DATASET" --steps "$STEPS" "$@"
