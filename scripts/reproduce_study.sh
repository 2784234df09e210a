#!/usr/bin/env bash
# The study's two presets trained with tf-emnist and with the study's PyTorch model on the
# same data (train: the folder's train files, 10% held out for validation; test: the
# official test split). Usage: scripts/reproduce_study.sh DATA_DIR [OUT_DIR]
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT_DIR]}
out=${2:-results/study}
py=${PYTHON:-.venv/bin/python}
baseline=${BASELINE:-../shared/baselines/seed_torch_lstm.py}
mkdir -p "$out"
for task in merged digit-letter; do
  "$py" -m tf_emnist.cli.main train --task "$task" --data-dir "$data" --output "runs/study-$task" 2>&1 | tee "$out/$task.log"
  mkdir -p "$out/$task"
  cp runs/study-$task/{config.json,metrics.json,history.csv,steps.csv,*.png} "$out/$task/"
done
if "$py" -c "import torch" 2>/dev/null; then
  for task in merged digit-letter; do
    "$py" "$baseline" --task "$task" --data "$data" | tee "$out/pytorch-$task.json"
  done
fi
