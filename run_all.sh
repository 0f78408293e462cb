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
# Probes as routes: PROBES=1 (or PROBES=linear, PROBES=knn) also probes each route's frozen encoder (run_probe.sh,
# probe.py): the linear probe per seed and k-NN once, each after the run that makes its checkpoint; report.py then
# shows the probe tables beside the fine-tuning table. $PROBE_STEPS: the linear probe's steps (default probe.py's
# 2000); $PROBE_FLAGS: flags for the probes only (e.g. "--knn_k 10"). The flags for every stage go to the probes too.
# Example: STEPS=50 FINETUNE_STEPS=50 SEEDS="1 2" bash run_all.sh cpu digits --model_name vit-mae-tiny
set -euo pipefail
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_all.sh slurm [DATASET ...] [flags...]: the same table as SLURM jobs (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_all.sh "${@:2}"

launcher run_all.sh "$@"
