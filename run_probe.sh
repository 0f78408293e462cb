#!/usr/bin/env bash
# Probes of a frozen encoder (probe.py): the linear probe, one run per seed in $SEEDS (default "1 2 3 4 5"), or
# --probe knn, one run (nothing is trained, no seed):
#   bash run_probe.sh GPU DATASET [SCRATCH] [CKPT] [CKPT_DIR] [probe.py flags...]
#   SCRATCH: True = the initial model (θ₀), False (default) = CKPT_DIR/CKPT/DATASET
#   CKPT: default self-further-pretrain-20000; CKPT_DIR: default checkpoints
#   GPU: cpu, a CUDA device index, or a list (0,1,2,3): the seeds are independent runs, spread over the GPUs,
#   $JOBS at a time on each (default 3 per GPU, 1 on cpu); with more than one at a time each run's output goes to
#   RESULTS/DATASET/INIT/probe-linear-seed<k>.log (probe-knn.log) and one line per finished run is printed.
#   Results: RESULTS/DATASET/INIT/probe-linear-seed<k>.json, probe-knn.json (INIT: initial or CKPT); report.py
#   shows them in tables of their own, beside the fine-tuning table.
#   --dataset, --scratch, --ckpt_name, --seed and --output_dir among the flags are refused, as in run_finetune.sh.
# Example: SEEDS="1 2" bash run_probe.sh cpu digits True --model_name vit-mae-tiny --steps 50
#          bash run_probe.sh cpu digits False further-pretrain-50 --model_name vit-mae-tiny --probe knn
set -euo pipefail
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_probe.sh slurm DATASET [SCRATCH] [CKPT] [CKPT_DIR] [flags...]: one SLURM job running the
# probe's runs on its GPUs (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_probe.sh "${@:2}"

launcher run_probe.sh "$@"
