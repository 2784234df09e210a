#!/usr/bin/env bash
# A keras-tuner search for the merged task sized for 2 CPU cores: 20,000 train images
# (18,000 + 2,000 validation), <= 3 epochs and 5 trials, unidirectional models no larger than
# 3 x 320 (so the final training stays within ~1.5x the study preset's time). Then the best
# configuration is trained on the whole train subset for the study's 7 epochs and evaluated
# once on the test split.
# Usage: scripts/tune_merged.sh DATA_DIR [OUT_DIR]
set -euo pipefail
data=${1:?usage: $0 DATA_DIR [OUT_DIR]}
out=${2:-results/tune}
tf=${TF_EMNIST:-.venv/bin/tf-emnist}
search=runs/tune-merged-random
"$tf" tune --task merged --data-dir "$data" --tuner random --max-trials 5 --epochs 3 \
  --limit-train 20000 --output "$search" --no-bidirectional \
  --space hidden_dim=128:320 --space num_layers=2:3 --space learning_rate=0.0003:0.003 \
  --space dropout=0.0:0.4 2>&1 | tee "$out/merged.log"
mkdir -p "$out/merged"
cp "$search"/{best_config.json,results.csv,trials.png} "$out/merged/"
"$tf" train --config "$search/best_config.json" --epochs 7 --data-dir "$data" --output runs/tuned-merged \
  2>&1 | tee "$out/merged-best-trained.log"
mkdir -p "$out/merged-best-trained"
cp runs/tuned-merged/{config.json,metrics.json,history.csv} "$out/merged-best-trained/"
