#!/usr/bin/env bash
# The study's two presets trained with tf-emnist and with the study's PyTorch model on the
# same data (train: the folder's train files, 10% held out for validation; test: the
# official test split). Usage: scripts/reproduce_study.sh DATA_DIR [OUT_DIR]
# BACKEND=jax trains on Keras's JAX backend instead (default tensorflow; the PyTorch runs are
# skipped then, as they do not depend on it).
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT_DIR]}
backend=${BACKEND:-tensorflow}
suffix=$([ "$backend" = tensorflow ] && echo "" || echo "-$backend")
out=${2:-results/study$suffix}
py=${PYTHON:-.venv/bin/python}
baseline=${BASELINE:-benchmarks/seed_torch_lstm.py}
mkdir -p "$out"
for task in merged digit-letter; do
  "$py" -m tf_emnist.cli.main train --backend "$backend" --task "$task" --data-dir "$data" \
    --output "runs/study-$task$suffix" 2>&1 | tee "$out/$task.log"
  mkdir -p "$out/$task"
  cp runs/study-$task$suffix/{config.json,metrics.json,history.csv,steps.csv,*.png} "$out/$task/"
  sed -i "s|$PWD/||g; s|$(dirname "$PWD")/|../|g" "$out/$task/config.json" "$out/$task.log"  # paths relative
done
if [ "$backend" = tensorflow ] && "$py" -c "import torch" 2>/dev/null; then
  for task in merged digit-letter; do
    "$py" "$baseline" --task "$task" --data "$data" | tee "$out/pytorch-$task.json"
  done
fi
