#!/usr/bin/env bash
# Runs GPU tests and benchmarks on the lent GPU machine (no network there).
# Usage (from the repository root; wheels from `pip download`, if any, carried in .carry/wheels):
#   KDA_OPS_COMMIT=<sha> bash bench/run_gpu.sh "<pytest args for tests>" "<pytest args for bench>"
#   KDA_OPS_COMMIT=<sha> SUITES="chunk_kda first_call" bash bench/run_gpu.sh
# Logs and results JSON go to $OUT (or ./gpu-out when $OUT is unset): the bench args' results to
# bench.json, each suite NAME of SUITES (bench/bench_NAME.py) to NAME.json, their output to
# bench.log. When .carry/fla_tc is carried (the *.autotune.json files of an earlier run's Triton
# cache), it seeds the Triton cache: fla's chunk_kda then skips its ~4 min autotune per head count.
set -uo pipefail
out=${OUT:-gpu-out}
mkdir -p "$out"
# wheels the image lacks (fla-core and einops for the fla comparison); pytest-benchmark is on it
if compgen -G ".carry/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/wheels/*.whl
fi
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=/tmp/triton-cache
mkdir -p "$TRITON_CACHE_DIR"
[ -d .carry/fla_tc ] && cp -r .carry/fla_tc/. "$TRITON_CACHE_DIR/"
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1 || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
status=0
if [ -n "${1:-}" ]; then
  python3 -m pytest $1 -q -rs -p no:cacheprovider 2>&1 | tee "$out/tests.log"
  status=${PIPESTATUS[0]}
fi
if [ -n "${2:-}" ]; then
  python3 -m pytest $2 -q -p no:cacheprovider --benchmark-json="$out/bench.json" 2>&1 | tee -a "$out/bench.log"
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
fi
for suite in ${SUITES:-}; do
  start=$SECONDS
  python3 -m pytest "bench/bench_$suite.py" -q -p no:cacheprovider --benchmark-json="$out/$suite.json" >>"$out/bench.log" 2>&1 || status=1
  echo "$suite: $(tail -1 "$out/bench.log"), $((SECONDS - start)) s"
done
exit $status
