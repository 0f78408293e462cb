# Shared by the run_*.sh launchers (sourced, not run).
#
# launch GPU SCRIPT [ARGS...] runs a stage:
#   GPU = cpu      -> python SCRIPT ARGS --device cpu
#   GPU = 3        -> CUDA_VISIBLE_DEVICES=3 python SCRIPT ARGS --device cuda
#   GPU = 0,1,2,3  -> CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --nproc_per_node=4 SCRIPT ARGS --device cuda
# --device goes right after SCRIPT, so a --device among ARGS (the user's extra flags) still wins.
# With LAUNCH_EXEC=exec the interpreter replaces the launcher's shell (same pid): a launcher that runs one
# stage and nothing after it, so a signal to the launcher (SIGTERM from a scheduler, `kill`) reaches the run
# itself; a shell would die of it and leave the run going.
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
      ${LAUNCH_EXEC:-} "$PYTHON" "$REPO_DIR/$script" --device cpu "$@" ;;
    *,*)
      [[ "$gpu" =~ ^[0-9]+(,[0-9]+)+$ ]] || usage_error "GPU '$gpu' is not a comma list of device indices"
      local n; n=$(tr ',' '\n' <<<"$gpu" | wc -l)
      CUDA_VISIBLE_DEVICES=$gpu ${LAUNCH_EXEC:-} "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$n" \
        "$REPO_DIR/$script" --device cuda "$@" ;;
    *)
      [[ "$gpu" =~ ^[0-9]+$ ]] || usage_error "GPU must be a CUDA device index (0), a list (0,1,2,3) or cpu, not '$gpu'"
      CUDA_VISIBLE_DEVICES=$gpu ${LAUNCH_EXEC:-} "$PYTHON" "$REPO_DIR/$script" --device cuda "$@" ;;
  esac
}

usage_error() {
  echo "error: $1" >&2
  echo "usage: $USAGE" >&2
  exit 2
}

# is_flag ARG: true when ARG starts the pass-through flags (so optional positionals stop there)
is_flag() { [[ "${1:-}" == -* ]]; }

# refuse_flags LAUNCHER HOW FLAG... -- ARGS...: one line and exit 2 when ARGS hold one of the FLAGs (--flag or
# --flag=value). For the flags whose values the launcher sets itself (the dataset, the init, the seed, the run
# directory): a later copy among the user's flags would win in the Python program but not in what the launcher
# reads back (its log and summary paths), so the summary would print another run's result. No parser accepts
# abbreviations, so the exact names are all there is to check. HOW says how to ask for it instead.
refuse_flags() {
  local launcher=$1 how=$2 flag arg
  shift 2
  local refused=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do refused+=("$1"); shift; done
  [ $# -eq 0 ] || shift
  for arg in "$@"; do
    for flag in "${refused[@]}"; do
      if [ "$arg" = "$flag" ] || [[ "$arg" == "$flag"=* ]]; then
        echo "error: $launcher takes no $flag: it sets it for each run itself; $how" >&2
        exit 2
      fi
    done
  done
}

# flag_value NAME DEFAULT ARGS...: the value of --NAME among ARGS (last one wins, as in argparse, which takes
# no abbreviations)
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
  LAUNCH_EXEC=exec launch "$gpu" "$script" --dataset "$dataset" --steps "$steps" "$@"
}

# ---- several independent runs side by side (run_finetune.sh, run_all.sh)
# One small run (a fine-tuning seed, batch 32-64) leaves most of a GPU idle; a few processes sharing it
# finish sooner in total (measured: 3 fine-tuning processes on one H200 gave 2.4x the throughput of one,
# 6 gave less than 3). Runs are independent processes, so the results are the same as one after another.
#
#   pool_init GPU               slots: $JOBS per device of GPU (cpu, 0, or 0,1,2,3); JOBS default 1 on
#                               cpu, 3 per GPU; slots alternate over the GPUs, so runs spread over them
#   pool_run NAME LOG FUNC ARGS starts `FUNC DEVICE ARGS` in a free slot (DEVICE: cpu or one index), its
#                               output appended to LOG (after a line naming the start); with a single slot
#                               it runs attached instead, its output on the terminal (as before JOBS
#                               existed), waited for before the next one, and LOG is not written
#   pool_attached NAME CMD...   runs CMD with its output on the terminal and waits for it (run_all.sh's
#                               MAE stages over a GPU list)
#   pool_wait                   waits for every run; lists the failed ones (name, exit code, log) and
#                               returns 2 if each failed with 2 (bad input), else 1; 0 if none failed
#   pool_drain                  waits for every run, reports nothing (for a next phase)
#   pool_failed NAME            true if the run NAME failed or was not started
# A failed run never stops the others; one that exits 2 (bad input, which the next runs share) stops
# new runs from starting. Needs bash >= 4.3 (wait -n) for JOBS > 1.
# SIGTERM or Ctrl-C stops every running run at once (exit 143 / 130): every run, attached ones too, is a
# background process the launcher waits for, because bash runs a trap only once its foreground command has
# ended. Runs in the background ignore Ctrl-C (bash without job control), so the trap stops them.
pool_init() {
  local gpu=$1 jobs=${JOBS:-} g j
  case "$gpu" in
    cpu) POOL_GPUS=(cpu) ;;
    *) [[ "$gpu" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
         usage_error "GPU must be a CUDA device index (0), a list (0,1,2,3) or cpu, not '$gpu'"
       IFS=, read -ra POOL_GPUS <<<"$gpu" ;;
  esac
  if [ -z "$jobs" ]; then if [ "$gpu" = cpu ]; then jobs=1; else jobs=3; fi; fi
  [[ "$jobs" =~ ^[1-9][0-9]*$ ]] || usage_error "JOBS must be a whole number >= 1 (runs per device), not '$jobs'"
  POOL_SLOTS=()
  for ((j = 0; j < jobs; j++)); do for g in "${POOL_GPUS[@]}"; do POOL_SLOTS+=("$g"); done; done
  POOL_PID=() POOL_NAME=() POOL_LOG=() POOL_FAILED=() POOL_FAILED_NAMES=() POOL_SKIPPED=()
  POOL_STOP=0 POOL_ALL_BAD_INPUT=1 POOL_ATTACHED=""
  POOL_DIR=$(mktemp -d)
  trap 'rm -rf "$POOL_DIR"' EXIT
  trap '_pool_abort 130' INT
  trap '_pool_abort 143' TERM
}

# _kill_tree PID: SIGTERM to PID and everything below it, each process before its children (a parent stopped
# first cannot start new ones); prints the pids signalled
_kill_tree() {
  local children child
  children=$(pgrep -P "$1" 2>/dev/null || true)
  kill -TERM "$1" 2>/dev/null && echo "$1"
  for child in $children; do _kill_tree "$child"; done
}

# _running PID: true while PID runs (a zombie nobody reaps has stopped)
_running() {
  local state
  state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
  [[ "$state" != Z* ]]
}

_pool_abort() {
  local code=$1 pid signalled=() waited=0
  trap '' INT TERM  # a second Ctrl-C must not cut the stopping short
  for pid in "${POOL_PID[@]+"${POOL_PID[@]}"}" $POOL_ATTACHED; do
    [ -z "$pid" ] || signalled+=($(_kill_tree "$pid"))
  done
  # until every process of every run has ended (SIGKILL after 30 s), so that the line below is true
  for pid in "${signalled[@]+"${signalled[@]}"}"; do
    while _running "$pid"; do
      if [ "$waited" -ge 300 ]; then kill -KILL "$pid" 2>/dev/null || true; sleep 0.1; break; fi
      sleep 0.1; waited=$((waited + 1))
    done
  done
  echo "interrupted: the runs were stopped; the same command continues them from their last saved state" >&2
  exit "$code"
}

# _pool_done NAME LOG RC: one line per finished run
_pool_done() {
  local name=$1 log=$2 rc=$3 last=""
  if [ "$rc" -eq 0 ]; then
    if [ -n "$log" ]; then last=$(tr '\r' '\n' <"$log" | grep -v '^[[:space:]]*$' | tail -n 1 || true); fi
    echo "[$name] done${last:+: $last}"
  else
    POOL_FAILED+=("$name: exit code $rc${log:+, log $log}")
    POOL_FAILED_NAMES+=("$name")
    echo "[$name] FAILED with exit code $rc${log:+; see $log}" >&2
    [ "$rc" -eq 2 ] && POOL_STOP=1 || POOL_ALL_BAD_INPUT=0
  fi
  return 0
}

# _pool_reap: record the runs that have finished and free their slots
_pool_reap() {
  local i pid rc
  for i in "${!POOL_SLOTS[@]}"; do
    pid=${POOL_PID[i]:-}
    [ -n "$pid" ] || continue
    if [ -f "$POOL_DIR/$i.rc" ] || ! kill -0 "$pid" 2>/dev/null; then
      rc=0
      wait "$pid" || rc=$?
      if [ -f "$POOL_DIR/$i.rc" ]; then rc=$(<"$POOL_DIR/$i.rc"); rm -f "$POOL_DIR/$i.rc"; fi
      POOL_PID[i]=""
      _pool_done "${POOL_NAME[i]}" "${POOL_LOG[i]}" "$rc"
    fi
  done
}

pool_run() {
  local name=$1 log=$2 slot i rc device
  shift 2
  if [ "$POOL_STOP" = 1 ]; then POOL_SKIPPED+=("$name"); POOL_FAILED_NAMES+=("$name"); return 0; fi
  if [ ${#POOL_SLOTS[@]} -eq 1 ]; then
    pool_attached "$name" "$1" "${POOL_SLOTS[0]}" "${@:2}"
    return 0
  fi
  while true; do
    _pool_reap
    slot=""
    for i in "${!POOL_SLOTS[@]}"; do
      if [ -z "${POOL_PID[i]:-}" ]; then slot=$i; break; fi
    done
    [ -n "$slot" ] && break
    wait -n 2>/dev/null || true  # until some run ends (_pool_reap then finds it)
  done
  if [ "$POOL_STOP" = 1 ]; then POOL_SKIPPED+=("$name"); POOL_FAILED_NAMES+=("$name"); return 0; fi
  mkdir -p "$(dirname "$log")"
  device=${POOL_SLOTS[slot]}
  [ "$device" = cpu ] || device="GPU $device"
  echo "[$name] started on $device, output in $log"
  # Appended, after a line naming this start: another launcher may be writing the same log (its run of the
  # same seed is then refused, but truncating would have cut the first run's output). set +e: a run's
  # failure is recorded, it must not end the launcher.
  ( set +e; echo "==== $(date '+%Y-%m-%d %H:%M:%S') $name on $device, launcher pid $$" >>"$log"
    "$1" "${POOL_SLOTS[slot]}" "${@:2}" >>"$log" 2>&1 </dev/null; rc=$?
    echo "$rc" >"$POOL_DIR/$slot.rc"; exit "$rc" ) &
  POOL_PID[slot]=$! POOL_NAME[slot]=$name POOL_LOG[slot]=$log
}

pool_attached() {  # NAME CMD...: CMD's output on the terminal; waited for, in the background (see above)
  local name=$1 rc=0
  shift
  ( set +e; "$@" ) &
  POOL_ATTACHED=$!
  wait "$POOL_ATTACHED" || rc=$?
  POOL_ATTACHED=""
  _pool_done "$name" "" "$rc"
}

pool_drain() {  # wait for every run, report nothing yet (pool_failed tells which failed)
  local busy i
  while true; do
    _pool_reap
    busy=0
    for i in "${!POOL_SLOTS[@]}"; do [ -z "${POOL_PID[i]:-}" ] || busy=1; done
    [ "$busy" = 1 ] || break
    wait -n 2>/dev/null || true
  done
}

pool_wait() {
  local failure
  pool_drain
  [ ${#POOL_FAILED[@]} -gt 0 ] || return 0
  echo "error: ${#POOL_FAILED[@]} run(s) failed:" >&2
  for failure in "${POOL_FAILED[@]}"; do echo "  $failure" >&2; done
  [ ${#POOL_SKIPPED[@]} -eq 0 ] || echo "  not started (after bad input): ${POOL_SKIPPED[*]}" >&2
  [ "$POOL_ALL_BAD_INPUT" = 1 ] && return 2 || return 1
}

pool_failed() {
  local name
  for name in "${POOL_FAILED_NAMES[@]+"${POOL_FAILED_NAMES[@]}"}"; do [ "$name" != "$1" ] || return 0; done
  return 1
}
