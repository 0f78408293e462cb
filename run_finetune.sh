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
source "$(dirname "$0")/launch/launch.sh"
# the cluster form, bash run_finetune.sh slurm DATASET [SCRATCH] [CKPT] [CKPT_DIR] [flags...]: one SLURM job running the
# seeds' pool on its GPUs (launch/submit.py)
[ "${1:-}" != slurm ] || PYTHONPATH="$REPO_DIR${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -m launch.submit --launcher run_finetune.sh "${@:2}"

launcher run_finetune.sh "$@"
