#!/usr/bin/env python3
"""Print the README's results table (markdown) from the files under results/."""
import json
import os
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "results"
STUDY = {"merged": (0.9007, 14.0), "digit-letter": (0.9206, 13.9)}


def load(name):
    path = os.path.join(root, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    return json.loads(text) if text else None


print("| task | model | train images | test accuracy | errors / 116,323 | training time |")
print("|---|---|---|---|---|---|")
for task in ("merged", "digit-letter"):
    accuracy, minutes = STUDY[task]
    print(f"| {task} | the study, PyTorch (as reported; full train split, P100) | 697,932 | {accuracy:.2%} | - | {minutes} min |")
    torch = load(f"torch-{task}.json")
    if torch:
        errors = round((1 - torch["test_accuracy"]) * torch["test_samples"])
        epochs = 8 if task == "digit-letter" else 7
        print(f"| {task} | the study's model, PyTorch (`seed_torch_lstm.py`), here | {torch['train_samples'] // epochs:,} "
              f"| {torch['test_accuracy']:.2%} | {errors:,} | {torch['train_s'] / 60:.1f} min |")
    for run, label in ((f"study-{task}", "tf-emnist, study preset (Keras LSTM, all XLA, float32)"),
                       (f"study-{task}-bf16", "tf-emnist, study preset, `--bf16-gradients`"),
                       (f"study-{task}-bf16-projection", "tf-emnist, study preset, the default on the AMD EPYC (the bfloat16 kernel)"),
                       (f"tuned-{task}", "tf-emnist, tuned (`tune` best, 7 epochs)"),
                       (f"best-{task}", "tf-emnist, `--preset best`")):
        metrics = load(os.path.join(run, "metrics.json"))
        if metrics:
            print(f"| {task} | {label} | {metrics['train_examples']:,} (+{metrics['validation_examples']:,} validation) "
                  f"| **{metrics['test_accuracy']:.2%}** | {metrics['test_errors']:,} | {metrics['train_seconds'] / 60:.1f} min |")
    # The ensemble chosen on validation for this task by scripts/choose_ensemble.py.
    choices = os.path.join(root, "ensembles", "validation.csv")
    if os.path.exists(choices):
        import csv

        with open(choices) as f:
            rows = list(csv.DictReader(f))
        column = "merged_validation_accuracy" if task == "merged" else "digit_letter_validation_accuracy"
        chosen = max(rows, key=lambda r: float(r[column]))["candidate"]
        metrics = load(os.path.join("ensembles", chosen, "metrics.json"))
        if metrics and int(max(rows, key=lambda r: float(r[column]))["members"]) > 1:
            key = "test_accuracy" if task == "merged" else "digit_letter_accuracy_grouped"
            errors = round((1 - metrics[key]) * metrics["test_examples"])
            print(f"| {task} | tf-emnist, ensemble chosen on validation ({chosen.replace('+', ' + ')}) "
                  f"| 110,726 (+12,303 validation) | **{metrics[key]:.2%}** | {errors:,} | sum of its members |")
