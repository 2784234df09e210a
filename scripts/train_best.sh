#!/usr/bin/env bash
# The final runs of `--preset best`: train on the train subset (minus the validation split),
# pick the epoch on validation, then evaluate once on the official test split.
# Usage: scripts/train_best.sh DATA_DIR [TASK...]   (default: merged digit-letter)
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [TASK...]}
shift
if [ $# -gt 0 ]; then tasks=("$@"); else tasks=(merged digit-letter); fi
tf=${TF_EMNIST:-.venv/bin/tf-emnist}
out=results/best-preset
mkdir -p "$out"
for task in "${tasks[@]}"; do
  # Run again after an interruption: it resumes at the last finished epoch.
  "$tf" train --task "$task" --preset best --data-dir "$data" --output "runs/best-$task" 2>&1 | tee -a "$out/$task.log"
  mkdir -p "$out/$task"
  cp "runs/best-$task"/{config.json,metrics.json,history.csv,train_state.json} "$out/$task/"
done
