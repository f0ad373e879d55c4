#!/usr/bin/env bash
# Re-run the overhead benchmarks of the earlier issues together, one after the other (they time things: never
# run two at once), logging each to benchmarks/results/<name>.log with its wall time.
#
#   bash benchmarks/run_all.sh           # full sizes (~15-30 min on 2 CPU cores)
#   bash benchmarks/run_all.sh --quick   # tiny sizes: checks that every benchmark still runs (~2-4 min)
#
# The end-to-end sweeps (digits_nfe.py, gmm_nfe.py) are not part of this: they train models; see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=. OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
PY="${PYTHON:-python}"
OUT=benchmarks/results
QUICK=0
[[ "${1:-}" == "--quick" ]] && QUICK=1 && OUT="${TMPDIR:-/tmp}/evodiff_run_all_quick"
mkdir -p "$OUT"

if (( QUICK )); then
  SOLVERS_ARGS=(--samples 256 --ode-steps 100 --repeats 2 --timing-steps 4)
  SCHEDULES_ARGS=(--samples 256 --fresh 4096 --nfe 5 10 --ode-steps 200 --mmse-levels 33 --mmse-mc 256 --out "$OUT")
  THROUGHPUT_ARGS=(--steps 3 --warmup 1 --repeats 1 --batch 32 --cifar-batch 4 --cifar-steps 1)
  VALIDATION_ARGS=(--num-samples 64 128 --batch-size 64 --grid-size 16)
else
  SCHEDULES_ARGS=(--out docs)
  SOLVERS_ARGS=() THROUGHPUT_ARGS=() VALIDATION_ARGS=()
fi

run() {  # name, then the command
  local name=$1; shift
  echo "== $name: $*" | tee "$OUT/$name.log"
  local start=$SECONDS
  "$@" 2>&1 | grep -v 'it/s' | tee -a "$OUT/$name.log"
  echo "== $name: $((SECONDS - start)) s" | tee -a "$OUT/$name.log"
}

run solvers_gmm "$PY" benchmarks/solvers_gmm.py --threads 1 "${SOLVERS_ARGS[@]}"
run schedules_gmm "$PY" benchmarks/schedules_gmm.py "${SCHEDULES_ARGS[@]}"
run train_throughput "$PY" benchmarks/train_throughput.py "${THROUGHPUT_ARGS[@]}"
run validation_cost "$PY" benchmarks/validation_cost.py "${VALIDATION_ARGS[@]}"
echo "logs in $OUT"
