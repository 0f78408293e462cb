#!/usr/bin/env bash
# Stage 3, fine-tuning, one run per seed in $SEEDS (default "1 2 3 4 5"), then mean ± std:
#   bash run_finetune.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [finetune.py flags...]
#   SCRATCH: True = from the initial model, False (default) = from CKPT_DIR/CKPT/DATASET
#   CKPT: default self-further-pretrain-20000; CKPT_DIR: default checkpoints
#   GPU: cpu, a CUDA device index, or a list (0,1,2,3): the seeds are independent runs, spread over the
#   GPUs, $JOBS at a time on each (default 3 per GPU, 1 on cpu); with more than one at a time each run's
#   output goes to RESULTS/DATASET/INIT/seed<k>.log and one line per finished run is printed.
#   A failed seed does not stop the others; the launcher then exits non-zero, naming it and its log.
#   --dataset, --scratch, --ckpt_name, --seed and --output_dir among the flags are refused: the launcher sets
#   them for each run from the positional arguments and $SEEDS, and its summary reads those runs' results.
# Example: SEEDS="1 2" bash run_finetune.sh cpu digits True --model_name vit-mae-tiny --steps 50
set -euo pipefail
USAGE="bash run_finetune.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [finetune.py flags...]"
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_finetune.sh slurm DATASET [SCRATCH] [CKPT] [CKPT_DIR] [flags...]: one SLURM job running the
# seeds' pool on its GPUs (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_finetune.sh "${@:2}"

[ $# -ge 2 ] || usage_error "GPU and DATASET are required"
GPU=$1 DATASET=$2
shift 2
SCRATCH=False CKPT=self-further-pretrain-20000 CKPT_DIR=checkpoints
if [ $# -gt 0 ] && ! is_flag "$1"; then SCRATCH=$1; shift; fi
if [ $# -gt 0 ] && ! is_flag "$1"; then CKPT=$1; shift; fi
if [ $# -gt 0 ] && ! is_flag "$1"; then CKPT_DIR=$1; shift; fi
case "$SCRATCH" in
  True|true|TRUE|1) INIT=initial ;;
  False|false|FALSE|0) INIT=$CKPT ;;
  *) usage_error "SCRATCH must be True or False, not '$SCRATCH'" ;;
esac
refuse_flags run_finetune.sh "give the dataset and the init as positional arguments ($USAGE) and the seeds as \
SEEDS=\"1 2 3\"; for a single run with its own --output_dir call finetune.py itself" \
  --dataset --scratch --ckpt_name --seed --output_dir -- "$@"
pool_init "$GPU"

RESULTS_DIR=$(flag_value --results_dir results "$@")  # the summary reads what the runs wrote
FLAGS=("$@")
finetune_seed() {  # DEVICE SEED
  launch "$1" finetune.py --dataset "$DATASET" --scratch "$SCRATCH" --ckpt_name "$CKPT" \
    --checkpoint_dir "$CKPT_DIR" --seed "$2" "${FLAGS[@]+"${FLAGS[@]}"}"
}

SEEDS=${SEEDS:-1 2 3 4 5}
for seed in $SEEDS; do
  pool_run "$DATASET $INIT seed $seed" "$RESULTS_DIR/$DATASET/$INIT/seed$seed.log" finetune_seed "$seed"
done
status=0
pool_wait || status=$?
[ "$status" -eq 0 ] || exit "$status"
"$PYTHON" "$REPO_DIR/report.py" --results_dir "$RESULTS_DIR" --datasets "$DATASET" --init "$INIT" --seeds $SEEDS
