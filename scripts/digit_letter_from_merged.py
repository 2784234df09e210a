#!/usr/bin/env python3
"""Make the digit-letter `--preset best` run from a finished merged `--preset best` run.

`tf-emnist train --task digit-letter --preset best` trains exactly what the merged best
preset trains: the same network on the same 47 ByMerge labels, the same seed, data order,
validation split and epoch choice (by 47-class validation accuracy). Only the saved model
differs: it ends with the weightless GroupLogSumExp layer, so that it answers digit or
letter. Rather than train the same thing twice, this script takes the merged run's model,
adds that layer, and writes a digit-letter run directory; evaluate it with
`tf-emnist evaluate`. The config it records is the digit-letter best preset's.

Usage: scripts/digit_letter_from_merged.py MERGED_RUN OUTPUT_RUN
"""
import os
import shutil
import sys

from tf_emnist.config import HYPERPARAMETERS
from tf_emnist.files import atomic_path, read_json, write_json
from tf_emnist.model import with_grouped_output
from tf_emnist.tasks import get_task
from tf_emnist.runs import load_run


def main(merged_run: str, output: str) -> None:
    model, config, task = load_run(merged_run)
    digit_letter = get_task("digit-letter")
    # The network and its optimisation must be the best preset's (the epoch count may differ).
    mismatched = [k for k in HYPERPARAMETERS if k != "epochs" and getattr(config, k) != getattr(digit_letter.best, k)]
    if task.name != "merged" or mismatched:
        sys.exit(f"{merged_run} is not a merged --preset best run (differs in: {', '.join(mismatched) or 'task'})")
    if os.path.exists(output):
        sys.exit(f"{output} exists; pick a new output directory")
    os.makedirs(output)
    write_json(os.path.join(output, "config.json"),
               config.replace(task="digit-letter", fine_labels=True).to_dict())
    for name in ("train_state.json", "history.csv", "steps.csv", "loss_steps.png", "loss_epochs.png",
                 "accuracy_epochs.png"):
        if os.path.exists(os.path.join(merged_run, name)):
            shutil.copy(os.path.join(merged_run, name), output)
    state = read_json(os.path.join(output, "train_state.json"))
    write_json(os.path.join(output, "train_state.json"), {**state, "made_from": os.path.abspath(merged_run)})
    with atomic_path(os.path.join(output, "model.keras")) as tmp:
        with_grouped_output(model, digit_letter.class_of_source).save(tmp)
    print(f"wrote {output}; evaluate it with: tf-emnist evaluate {output}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    main(sys.argv[1], sys.argv[2])
