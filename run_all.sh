#!/usr/bin/env bash
# The paper's whole table:  bash run_all.sh GPU [DATASET ...] [flags for every stage...]
#   per dataset: further pre-training, self-distillation, then fine-tuning from the initial model, the
#   further pre-trained and the self-distilled one ($SEEDS, default "1 2 3 4 5"); then report.py.
#   DATASET default: the six datasets of the paper. $STEPS (default 20000) sets the MAE stages' length.
# The flags go to every stage, so use those the three share (--model_name, --data_dir, --batch_size,
# --checkpoint_dir, --workers, --precision, --compile, ...); results go to results/.
# Re-running continues: finished runs are skipped, interrupted ones resume from their last saved state
# (saved every 1000 steps here; pass --save_every N to change it).
# Example: STEPS=50 SEEDS="1 2" bash run_all.sh cpu digits --model_name vit-mae-tiny --batch_size 16
set -euo pipefail
USAGE="bash run_all.sh GPU [DATASET ...] [flags for every stage...]"
source "$(dirname "$0")/scripts/launch.sh"

[ $# -ge 1 ] || usage_error "GPU is required"
GPU=$1
shift
DATASETS=()
while [ $# -gt 0 ] && ! is_flag "$1"; do DATASETS+=("$1"); shift; done
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=(aircraft chest_xray cub dtd stanford_dogs vgg_flower_102)
STEPS=${STEPS:-20000}
export SEEDS=${SEEDS:-1 2 3 4 5}

for dataset in "${DATASETS[@]}"; do
  echo "=== $dataset: further pre-training, self-distillation, fine-tuning ($STEPS MAE steps; seeds $SEEDS)"
  bash "$REPO_DIR/run_pretrain.sh" "$GPU" "$dataset" "$STEPS" --save_every 1000 "$@"
  bash "$REPO_DIR/run_selftrain.sh" "$GPU" "$dataset" "$STEPS" --save_every 1000 "$@"
  bash "$REPO_DIR/run_finetune.sh" "$GPU" "$dataset" True --save_every 1000 "$@"
  bash "$REPO_DIR/run_finetune.sh" "$GPU" "$dataset" False "further-pretrain-$STEPS" --save_every 1000 "$@"
  bash "$REPO_DIR/run_finetune.sh" "$GPU" "$dataset" False "self-further-pretrain-$STEPS" --save_every 1000 "$@"
done

"$PYTHON" "$REPO_DIR/report.py" --datasets "${DATASETS[@]}" --steps "$STEPS"
