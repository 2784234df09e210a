#!/usr/bin/env python3
"""A fixed-seed sample of EMNIST ByMerge's train split, written as NIST's files beside its full test split.

The figures in README.md and docs/results.md come from a 123,029-image real train subset, 17.6 %
of the official 697,932. This draws a sample of that size from the full split (tensorflow-datasets
downloads it, or --data-dir reads NIST's files), seeded, so that runs on it compare with those
figures. It is a sample of the same size and kind, not the same images.

Usage: python scripts/sample_train.py OUT_DIR [--data-dir NIST_DIR] [--fraction 0.17627] [--seed 0]
       tf-emnist train --task merged --data-dir OUT_DIR
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tf_emnist.config import TrainConfig  # noqa: E402
from tf_emnist.data import load_split  # noqa: E402
from tf_emnist.nist import write_mapping, write_split  # noqa: E402
from tf_emnist.tasks import get_task  # noqa: E402

SUBSET_FRACTION = 123_029 / 697_932


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="folder to write NIST's files into")
    parser.add_argument("--data-dir", help="NIST's files of the full split (default: tensorflow-datasets)")
    parser.add_argument("--fraction", type=float, default=SUBSET_FRACTION,
                        help=f"share of the train split to keep (default {SUBSET_FRACTION:.5f}, the results' subset)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draw (default 0)")
    args = parser.parse_args()
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    task = get_task("merged")
    config = TrainConfig(data_dir=args.data_dir)
    images, labels = load_split(task, "train", config, source_labels=True)
    keep = np.sort(np.random.default_rng(args.seed).permutation(len(labels))[:round(args.fraction * len(labels))])
    os.makedirs(args.out_dir, exist_ok=True)
    write_split(args.out_dir, task.split, "train", images[keep], labels[keep].astype(np.uint8))
    test_images, test_labels = load_split(task, "test", config, source_labels=True)
    write_split(args.out_dir, task.split, "test", test_images, test_labels.astype(np.uint8))
    write_mapping(args.out_dir, task.split, task.source_chars)
    print(f"{len(keep):,} of {len(labels):,} train images (seed {args.seed}) and all {len(test_labels):,} test "
          f"images in {args.out_dir}; train on them with: tf-emnist train --data-dir {args.out_dir}")


if __name__ == "__main__":
    main()
