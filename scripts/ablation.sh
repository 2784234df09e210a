#!/usr/bin/env bash
# Ablation of the levers beyond the study on the merged task, on the validation split only
# (24,000 train images, 3 epochs each, the study preset otherwise). Writes results/ablation/merged.csv.
# Usage: scripts/ablation.sh DATA_DIR [OUT_DIR]
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT_DIR]}
out=${2:-results/ablation}
tf=${TF_EMNIST:-.venv/bin/tf-emnist}
py=${PYTHON:-.venv/bin/python}
declare -A levers=(
  [study]=""
  [augment]="--augment 1.0"
  [bidirectional]="--bidirectional"
  [cosine]="--lr-schedule cosine"
  [label_smoothing]="--label-smoothing 0.1"
  [adamw]="--weight-decay 0.0001"
  [clipnorm]="--clipnorm 1.0"
  [bi3x128]="--bidirectional --hidden-dim 128"
  [bi2x192]="--bidirectional --hidden-dim 192 --num-layers 2"
  [ema]="--ema 0.99"  # an average over ~100 steps: these runs take 255
)
names=(study augment bidirectional cosine label_smoothing adamw clipnorm bi3x128 bi2x192 ema)
: > "$out/merged.log"  # a rerun trains only the missing rows, and prints every row again
for name in "${names[@]}"; do
  # shellcheck disable=SC2086
  "$tf" -q train --task merged --data-dir "$data" --limit-train 24000 --epochs 3 --no-evaluate \
    --output "runs/ablation-$name" ${levers[$name]} 2>&1 | tail -1 | tee -a "$out/merged.log"
done
"$py" - "$out/merged.csv" "${names[@]}" <<'PY'
import csv, json, sys
names = sys.argv[2:]
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["lever", "best_val_accuracy", "best_epoch", "train_minutes"])
    for n in names:
        s = json.load(open(f"runs/ablation-{n}/train_state.json"))
        w.writerow([n, round(s["best_val_accuracy"], 4), s["best_epoch"], round(s["train_seconds"] / 60, 2)])
PY
cat "$out/merged.csv"
