#!/usr/bin/env bash
# Synthetic-task runs on the lent GPU machine: for each gate kind (channel = KDA, head = the scalar
# gate of GDN) and each task (palindrome, mqar, stack), train.py at one training length, then one
# comparison PNG of all of them. Runs one after another (timings are of a GPU to itself), the tasks
# of one gate back to back so that their identical graphs reuse Inductor's cache.
#
# Usage (repository root): KDA_OPS_COMMIT=<sha> bash bench/synthetic/run_gpu.sh SEQ_LEN STEPS [train.py args]
#   GATES="channel head" and TASKS="palindrome mqar stack" (the defaults) pick a subset.
# Writes to ${OUT:-bench/results/h100}/synthetic: one JSON per run, curves_T<SEQ_LEN>.png and
# train_T<SEQ_LEN>.log (8 files for the full set: the most the device tool brings back).
set -uo pipefail
seq_len=$1
steps=$2
shift 2
out=${OUT:-bench/results/h100}/synthetic
log=$out/train_T$seq_len.log
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$log" 2>&1 || { cat "$log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$log"
status=0
for gate in ${GATES:-channel head}; do
  for task in ${TASKS:-palindrome mqar stack}; do
    python3 bench/synthetic/train.py --task "$task" --seq-len "$seq_len" --steps "$steps" --gate "$gate" \
      --out "$out" --no-plot "$@" 2>&1 | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
done
python3 bench/synthetic/plot_curves.py --out "$out/curves_T$seq_len.png" "$out"/*_T"${seq_len}"_*.json 2>&1 | tee -a "$log"
exit $status
