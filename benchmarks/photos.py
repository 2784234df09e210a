"""Accuracy on photos of handwriting against clean scans of the same real EMNIST test characters.

Each test character (the first N of the official test split) is rendered three ways and
read through `predict`'s preprocessing: as the 28x28 array itself, as a clean scan (dark
ink on white paper, scaled up), and as a phone-like photo (`tf_emnist.synthetic`: uneven
lighting and a shadow, grey ink, tilt, noise, blur, JPEG). Lines of 5 characters written
apart are read with `--segment`'s function.

Usage: python benchmarks/photos.py MODEL DATA_DIR [--limit 3000] [--output results/photos/merged.json]
"""
import argparse
import json

import numpy as np

from tf_emnist.config import TrainConfig
from tf_emnist.data import load_split
from tf_emnist.files import write_json
from tf_emnist.predict import Predictor
from tf_emnist.preprocess import preprocess, segment_line
from tf_emnist.synthetic import render_photo, render_scan
from tf_emnist.tasks import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data_dir")
    parser.add_argument("--limit", type=int, default=3000, help="test characters (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the figures as JSON")
    args = parser.parse_args()

    stored, labels = load_split(get_task("merged"), "test", TrainConfig(data_dir=args.data_dir, limit_test=args.limit))
    upright = np.ascontiguousarray(stored.transpose(0, 2, 1))
    rng = np.random.default_rng(args.seed)
    predictor = Predictor(args.model)

    def accuracy(images):
        return float(np.mean(predictor(np.stack(images))["class_ids"] == labels[:len(images)]))

    figures = {"characters": len(labels),
               "array": accuracy(list(upright)),
               "clean_scan": accuracy([preprocess(render_scan(c)) for c in upright]),
               "photo": accuracy([preprocess(render_photo(c, rng)) for c in upright])}
    counted = right = read = 0
    lines = len(labels) // 5
    for i in range(lines):
        characters = segment_line(render_photo(upright[5 * i: 5 * i + 5], rng))
        if len(characters) == 5:
            counted += 1
            ids = predictor(np.stack([c.image for c in characters]))["class_ids"]
            right += int(np.sum(ids == labels[5 * i: 5 * i + 5]))
            read += 5
    figures.update(lines=lines, lines_with_5_characters=counted / lines,
                   line_character_accuracy=right / max(read, 1))
    print(json.dumps(figures, indent=1))
    if args.output:
        write_json(args.output, figures)


if __name__ == "__main__":
    main()
