#!/usr/bin/env bash
# The GPU check (docs/reinforce.md#the-gpu-check): reinforces a few hundred 224 px synthetic samples with two
# ViT-B-16 teachers and the CoCa ViT-L-14 captioner (random weights, bf16, CUDA) through the real reinforcement job
# on a local Ray, and writes views/s, MFU, the GPU busy fraction and the DataCompDR-12M projection to
# $OUT_DIR/gpu_check.{json,md}. Unattended, at most 8 minutes: each phase has its own time limit.
#
#   jobs/gpu_check.sh          on a machine with one CUDA device (fails at once without one)
#   jobs/gpu_check.sh smoke    the same phases on the CPU at tiny sizes (what tests/integration/test_gpu_check.py runs)
#
# Results: $GPU_CHECK_OUT, else $OUT, else ./gpu-check-out; working files: $GPU_CHECK_WORK, else
# $TMPDIR/clipdr-gpu-check. Python: $CLIPDR_PYTHON, else .venv/bin/python (`make setup`), else python3 (the
# project's Docker image). Nothing is downloaded: a Python without clipdr's packages gets them from a wheelhouse,
# $GPU_CHECK_WHEELS (default .gpu-wheels), if there is one, else the check stops naming what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

MODE="${1:-gpu}"
case "$MODE" in
  gpu) SMOKE=(); SAMPLES="${GPU_CHECK_SAMPLES:-512}" ;;
  smoke) SMOKE=(--smoke); SAMPLES="${GPU_CHECK_SAMPLES:-8}" ;;
  *) echo "usage: jobs/gpu_check.sh [gpu|smoke]" >&2; exit 2 ;;
esac
OUT_DIR="${GPU_CHECK_OUT:-${OUT:-gpu-check-out}}"
WORK_DIR="${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/clipdr-gpu-check}"  # the world, the reinforced output, MLflow's store
mkdir -p "$OUT_DIR" "$WORK_DIR"
PY="${CLIPDR_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/platform${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MLFLOW_DISABLE_TELEMETRY=true \
  RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1

MODULES="torch torchvision open_clip timm pyarrow psutil"  # ray and mlflow: the Ray job phase only (skipped without)
missing() { "$PY" - "$@" <<'PY'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PY
}
MISSING="$(missing $MODULES)"
WHEELS="${GPU_CHECK_WHEELS:-.gpu-wheels}"
if [ -n "$MISSING" ] && [ -d "$WHEELS" ]; then
  echo "gpu check: $PY lacks $MISSING; installing from the wheelhouse $WHEELS (no index)"
  SITE="${TMPDIR:-/tmp}/clipdr-gpu-check-site"
  timeout 180 "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:$SITE"
  MISSING="$(missing $MODULES)"
fi
if [ -n "$MISSING" ]; then
  echo "gpu check: $PY lacks $MISSING. Run it with the project's venv (make setup), in its Docker image" \
       "(docker/Dockerfile, target runtime), or with a wheelhouse in \$GPU_CHECK_WHEELS (docs/reinforce.md)" >&2
  exit 1
fi

phase() {  # phase NAME LIMIT_S: SIGINT at the limit (Ray's local cluster shuts down with the driver), then KILL
  local name="$1" limit="$2" started=$SECONDS
  echo "== gpu check: $name (limit ${limit} s)"
  if ! timeout --signal=INT --kill-after=20 "$limit" "$PY" jobs/benchmark.py gpu_check --phase "$name" \
      --out "$OUT_DIR" --work "$WORK_DIR" --samples "$SAMPLES" "${SMOKE[@]}"; then
    echo "gpu check: phase $name failed or ran past ${limit} s" >&2
    return 1
  fi
  echo "== gpu check: $name done in $((SECONDS - started)) s"
}
phase env 20 || exit 1
phase data 30 || exit 1
FAILED=0  # a measuring phase that fails leaves the others to run; the report shows what was measured
phase stages 150 || FAILED=1
phase train 120 || FAILED=1
phase compile 150 || FAILED=1
phase reinforce 40 || FAILED=1
phase report 20 || exit 1
echo "gpu check: results in $OUT_DIR/gpu_check.json and $OUT_DIR/gpu_check.md"
exit $FAILED
