# Shared by the run_*.sh launchers (sourced, not run).
#
# launch GPU SCRIPT [ARGS...] runs a stage:
#   GPU = cpu      -> python SCRIPT ARGS --device cpu
#   GPU = 3        -> CUDA_VISIBLE_DEVICES=3 python SCRIPT ARGS --device cuda
#   GPU = 0,1,2,3  -> CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc_per_node=4 SCRIPT ARGS --device cuda
# --device goes right after SCRIPT, so a --device among ARGS (the user's extra flags) still wins.
# The interpreter: $PYTHON, else the repository's .venv (made by `make`), else python3.

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO_DIR/.venv/bin/python" ]; then PYTHON="$REPO_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

launch() {
  local gpu=$1 script=$2
  shift 2
  case "$gpu" in
    cpu)
      "$PYTHON" "$REPO_DIR/$script" --device cpu "$@" ;;
    *,*)
      [[ "$gpu" =~ ^[0-9]+(,[0-9]+)+$ ]] || usage_error "GPU '$gpu' is not a comma list of device indices"
      local n; n=$(tr ',' '\n' <<<"$gpu" | wc -l)
      CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" \
        "$REPO_DIR/$script" --device cuda "$@" ;;
    *)
      [[ "$gpu" =~ ^[0-9]+$ ]] || usage_error "GPU must be a CUDA device index (0), a list (0,1,2,3) or cpu, not '$gpu'"
      CUDA_VISIBLE_DEVICES=$gpu "$PYTHON" "$REPO_DIR/$script" --device cuda "$@" ;;
  esac
}

usage_error() {
  echo "error: $1" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

# is_flag ARG: true when ARG starts the pass-through flags (so optional positionals stop there)
is_flag() { [[ "${1:-}" == -* ]]; }

# flag_value NAME DEFAULT ARGS...: the value of --NAME among ARGS (last one wins, as in argparse)
flag_value() {
  local name=$1 value=$2 prev=""
  shift 2
  for arg in "$@"; do
    [ "$prev" = "$name" ] && value=$arg
    [[ "$arg" == "$name"=* ]] && value=${arg#"$name"=}
    prev=$arg
  done
  echo "$value"
}

# mae_stage SCRIPT GPU DATASET [STEPS] [flags...]: run_pretrain.sh and run_selftrain.sh
mae_stage() {
  local script=$1
  shift
  [ $# -ge 2 ] || usage_error "GPU and DATASET are required"
  local gpu=$1 dataset=$2 steps=20000
  shift 2
  if [ $# -gt 0 ] && ! is_flag "$1"; then steps=$1; shift; fi
  launch "$gpu" "$script" --dataset "$dataset" --steps "$steps" "$@"
}
