#!/usr/bin/env bash
# The paper's whole table:  bash run_all.sh GPU [DATASET ...] [flags for every stage...]
#   per dataset: further pre-training, self-distillation, then fine-tuning from the initial model, the
#   further pre-trained and the self-distilled one ($SEEDS, default "1 2 3 4 5"); then report.py.
#   DATASET default: the six datasets of the paper.
#   Lengths: $STEPS (default 20000) for the MAE stages, $FINETUNE_STEPS for fine-tuning (default:
#   finetune.py's 10000); --steps among the flags is refused (it would cut every stage alike).
# The flags go to every stage, so use those the three share (--model_name, --data_dir, --batch_size,
# --checkpoint_dir, --workers, --precision, --compile, ...). Those the launcher sets for each run itself
# (--dataset, --seed, --scratch, --ckpt_name, --output_dir) are refused: a later copy would win in the
# stage, but not in the result files the launcher reads back.
# Independent runs go side by side: the MAE stages of different datasets, and all fine-tuning runs,
# $JOBS at a time per device (default 3 per GPU, 1 on cpu); with a list of GPUs (0,1,2,3) each run
# gets one GPU, round-robin. With fewer datasets than GPUs the MAE stages run one dataset at a time
# with DistributedDataParallel over all of them instead. With more than one run at a time, each run's
# output goes to a log file (results/DATASET/INIT/seed<k>.log, results/DATASET/mae-STEPS.log).
# A failed run does not stop the others; the launcher then exits non-zero, naming it and its log.
# Re-running continues: finished runs are skipped, interrupted ones resume from their last saved state
# (saved every 1000 steps here; pass --save_every N to change it).
# Flags for one kind of stage only: $MAE_FLAGS (further pre-training and self-distillation) and $FINETUNE_FLAGS
# (fine-tuning), e.g. MAE_FLAGS="--lr 1e-3" FINETUNE_FLAGS="--lr 3e-3 --warmup_steps 40" (make demo does).
# Example: STEPS=50 FINETUNE_STEPS=50 SEEDS="1 2" bash run_all.sh cpu digits --model_name vit-mae-tiny
set -euo pipefail
USAGE="bash run_all.sh GPU [DATASET ...] [flags for every stage...]"
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_all.sh slurm [DATASET ...] [flags...]: the same table as SLURM jobs (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_all.sh "${@:2}"

[ $# -ge 1 ] || usage_error "GPU is required"
GPU=$1
shift
DATASETS=()
while [ $# -gt 0 ] && ! is_flag "$1"; do DATASETS+=("$1"); shift; done
[ ${#DATASETS[@]} -gt 0 ] || DATASETS=(aircraft chest_xray cub dtd stanford_dogs vgg_flower_102)
STEPS=${STEPS:-20000}
FINETUNE_STEPS=${FINETUNE_STEPS:-}
refuse_flags run_all.sh "use STEPS=N for the MAE stages (now $STEPS) and FINETUNE_STEPS=N for fine-tuning \
(now ${FINETUNE_STEPS:-10000})" --steps -- "$@"
refuse_flags run_all.sh "give the datasets as positional arguments ($USAGE) and the seeds as SEEDS=\"1 2 3\"; \
it runs every init; for single runs use run_pretrain.sh, run_selftrain.sh, run_finetune.sh" \
  --dataset --seed --scratch --ckpt_name --output_dir -- "$@"
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || usage_error "STEPS must be a whole number >= 1, not '$STEPS'"
[ -z "$FINETUNE_STEPS" ] || [[ "$FINETUNE_STEPS" =~ ^[1-9][0-9]*$ ]] ||
  usage_error "FINETUNE_STEPS must be a whole number >= 1, not '$FINETUNE_STEPS'"
SEEDS=${SEEDS:-1 2 3 4 5}
pool_init "$GPU"
read -ra MAE_ONLY <<<"${MAE_FLAGS:-}"
read -ra FINETUNE_ONLY <<<"${FINETUNE_FLAGS:-}"
refuse_flags "run_all.sh's MAE_FLAGS / FINETUNE_FLAGS" "use STEPS=N / FINETUNE_STEPS=N" --steps -- \
  "${MAE_ONLY[@]+"${MAE_ONLY[@]}"}" "${FINETUNE_ONLY[@]+"${FINETUNE_ONLY[@]}"}"
refuse_flags "run_all.sh's MAE_FLAGS / FINETUNE_FLAGS" "run_all.sh sets them for each run" \
  --dataset --seed --scratch --ckpt_name --output_dir -- \
  "${MAE_ONLY[@]+"${MAE_ONLY[@]}"}" "${FINETUNE_ONLY[@]+"${FINETUNE_ONLY[@]}"}"
RESULTS_DIR=$(flag_value --results_dir results "$@" "${FINETUNE_ONLY[@]+"${FINETUNE_ONLY[@]}"}")
# the MAE stages get every flag but fine-tuning's own (--results_dir X, --save_model), which they would refuse
mae_args=()
skip_value=0
for arg in "$@"; do
  if [ "$skip_value" = 1 ]; then skip_value=0; continue; fi
  case "$arg" in
    --results_dir) skip_value=1 ;;
    --results_dir=*|--save_model) ;;
    *) mae_args+=("$arg") ;;
  esac
done
mae_args+=("${MAE_ONLY[@]+"${MAE_ONLY[@]}"}")
finetune_args=(--save_every 1000)
[ -z "$FINETUNE_STEPS" ] || finetune_args+=(--steps "$FINETUNE_STEPS")
finetune_args+=("$@" "${FINETUNE_ONLY[@]+"${FINETUNE_ONLY[@]}"}")
ROUTES=("further-pretrain-$STEPS" "self-further-pretrain-$STEPS")

mae_stages() {  # DEVICE DATASET: the teacher, then the student
  bash "$REPO_DIR/run_pretrain.sh" "$1" "$2" "$STEPS" --save_every 1000 "${mae_args[@]+"${mae_args[@]}"}" &&
    bash "$REPO_DIR/run_selftrain.sh" "$1" "$2" "$STEPS" --save_every 1000 "${mae_args[@]+"${mae_args[@]}"}"
}
finetune_run() {  # DEVICE DATASET INIT SEED
  local scratch=False
  [ "$3" != initial ] || scratch=True
  launch "$1" finetune.py --dataset "$2" --scratch "$scratch" --ckpt_name "$3" --seed "$4" "${finetune_args[@]}"
}
finetune_all() {  # DATASET INIT
  local seed
  for seed in $SEEDS; do
    pool_run "$1 $2 seed $seed" "$RESULTS_DIR/$1/$2/seed$seed.log" finetune_run "$1" "$2" "$seed"
  done
}

echo "=== ${DATASETS[*]}: further pre-training and self-distillation ($STEPS steps), fine-tuning" \
     "(${FINETUNE_STEPS:-10000} steps; seeds $SEEDS); ${#POOL_SLOTS[@]} run(s) at a time"
if [ ${#POOL_GPUS[@]} -gt 1 ] && [ ${#DATASETS[@]} -lt ${#POOL_GPUS[@]} ]; then
  # too few datasets to fill the GPUs one each: each MAE run uses all of them (DDP), one after another
  for dataset in "${DATASETS[@]}"; do pool_attached "$dataset MAE stages" mae_stages "$GPU" "$dataset"; done
  for dataset in "${DATASETS[@]}"; do finetune_all "$dataset" initial; done
else
  for dataset in "${DATASETS[@]}"; do
    pool_run "$dataset MAE stages" "$RESULTS_DIR/$dataset/mae-$STEPS.log" mae_stages "$dataset"
  done
  for dataset in "${DATASETS[@]}"; do finetune_all "$dataset" initial; done
  pool_drain  # fine-tuning from the checkpoints needs them
fi
for dataset in "${DATASETS[@]}"; do
  if pool_failed "$dataset MAE stages"; then continue; fi
  for init in "${ROUTES[@]}"; do finetune_all "$dataset" "$init"; done
done
status=0
pool_wait || status=$?
[ "$status" -ne 2 ] || exit 2  # bad input: the runs that started failed alike, the rest did not start

route_done() {  # DATASET INIT: every seed of it finished (and the checkpoint it starts from exists)
  local seed
  [ "$2" = initial ] || ! pool_failed "$1 MAE stages" || return 1
  for seed in $SEEDS; do ! pool_failed "$1 $2 seed $seed" || return 1; done
}
for dataset in "${DATASETS[@]}"; do
  for init in initial "${ROUTES[@]}"; do
    if route_done "$dataset" "$init"; then
      "$PYTHON" "$REPO_DIR/report.py" --results_dir "$RESULTS_DIR" --datasets "$dataset" --init "$init" \
        --seeds $SEEDS || status=1
    fi
  done
done
"$PYTHON" "$REPO_DIR/report.py" --results_dir "$RESULTS_DIR" --datasets "${DATASETS[@]}" --steps "$STEPS" ||
  status=1
exit "$status"
