#!/usr/bin/env python3
"""Choose among single runs and ensembles of merged runs on validation, then test the choice once.

Candidates are the merged best run alone and with the other finished merged runs. A member
may also be a SavedModel written by `tf-emnist export` (an exported ensemble counts as
its models), so that members kept in the repository outlive the run directories. Each is
evaluated on the validation images all of them held out (same seed and fraction). The
candidate with the best validation accuracy is evaluated once on the official test
split. The same is done for digit-letter, scored by the summed probabilities of digits
and letters (what a `--fine-labels` model answers). Writes OUTPUT/validation.csv
and one metrics.json per tested choice.

Usage: scripts/choose_ensemble.py BEST_RUN OTHER_RUN... [--output results/ensemble]
       (a run directory or an export, e.g. saved_models/merged/5, wherever a run goes)
"""
import argparse
import itertools
import os

from tf_emnist.evaluate import evaluate_runs
from tf_emnist.files import write_csv
from tf_emnist.sources import keras_file


def member_name(path: str) -> str:
    """runs/best-merged -> best-merged; saved_models/merged/5 -> merged-v5."""
    path = os.path.normpath(path)
    if keras_file(path) is None:  # an export
        return f"{os.path.basename(os.path.dirname(path))}-v{os.path.basename(path)}"
    return os.path.basename(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("best")
    parser.add_argument("others", nargs="+")
    parser.add_argument("--output", default="results/ensemble")
    args = parser.parse_args()

    groups = [(args.best,)] + [(args.best, *more) for n in range(1, len(args.others) + 1)
                               for more in itertools.combinations(args.others, n)]
    candidates = {"+".join(member_name(m) for m in members): members for members in groups}
    rows, cache = [], {}  # cache: each member's logits, computed once per split
    for name, members in candidates.items():
        out = os.path.join(args.output, name)
        metrics = evaluate_runs(members, split="validation", output=out, cache=cache)
        rows.append({"candidate": name, "members": len(members),
                     "merged_validation_accuracy": round(metrics["validation_accuracy"], 5),
                     "digit_letter_validation_accuracy": round(metrics["digit_letter_accuracy_grouped"], 5)})
        print(rows[-1], flush=True)
    write_csv(os.path.join(args.output, "validation.csv"), rows)

    tested = {}
    for key in ("merged_validation_accuracy", "digit_letter_validation_accuracy"):
        choice = max(rows, key=lambda r: r[key])["candidate"]
        if choice not in tested:  # the test split, once per chosen candidate
            tested[choice] = evaluate_runs(candidates[choice], split="test", output=os.path.join(args.output, choice),
                                           cache=cache)
        metrics = tested[choice]
        figure = metrics["test_accuracy"] if key.startswith("merged") else metrics["digit_letter_accuracy_grouped"]
        print(f"{key.split('_validation')[0]}: chose {choice} on validation; test accuracy {figure:.4%}")


if __name__ == "__main__":
    main()
