#!/usr/bin/env python3
"""Write examples/ (character images to try `predict` on) and docs/preprocessing.png.

From real EMNIST test characters: clean scans (dark ink on white), phone-like photos and a
photographed line; and two characters drawn as strokes on a transparent canvas, as the
drawing pad sends them. The figure shows each preprocessing step for one photo.

Usage: scripts/make_examples.py DATA_DIR
"""
import argparse
import os

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageDraw

from tf_emnist.config import TrainConfig
from tf_emnist.data import load_split
from tf_emnist.files import save_figure
from tf_emnist.preprocess import preprocess, preprocessing_stages
from tf_emnist.synthetic import render_photo, render_scan
from tf_emnist.tasks import get_task

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def first_of(labels, class_names, character: str) -> int:
    return int(np.flatnonzero(labels == class_names.index(character))[0])


def drawn(strokes, size: int = 280, width: int = 18) -> Image.Image:
    """Black strokes on a transparent canvas (points in a 0-1 square)."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line([(x * size, y * size) for x, y in stroke], fill=(0, 0, 0, 255), width=width, joint="curve")
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir")
    args = parser.parse_args()
    task = get_task("merged")
    stored, labels = load_split(task, "test", TrainConfig(data_dir=args.data_dir, limit_test=5000))
    upright = np.ascontiguousarray(stored.transpose(0, 2, 1))
    names = list(task.class_names)
    rng = np.random.default_rng(7)
    out = os.path.join(ROOT, "examples")
    os.makedirs(out, exist_ok=True)
    for character in "7Ae":
        Image.fromarray(render_scan(upright[first_of(labels, names, character)])).save(
            os.path.join(out, f"scan-{character}.png"))
    for character in "3R":
        Image.fromarray(render_photo(upright[first_of(labels, names, character)], rng)).save(
            os.path.join(out, f"photo-{character}.jpg"), quality=85)
    line = [upright[first_of(labels, names, c)] for c in "E2b4N"]
    Image.fromarray(render_photo(np.stack(line), rng)).save(os.path.join(out, "line-E2b4N.jpg"), quality=85)
    drawn([[(0.55, 0.12), (0.2, 0.62), (0.75, 0.62)], [(0.55, 0.12), (0.55, 0.9)]]).save(
        os.path.join(out, "drawn-4.png"))
    drawn([[(0.25, 0.15), (0.75, 0.85)], [(0.75, 0.15), (0.25, 0.85)]]).save(os.path.join(out, "drawn-X.png"))

    photo = render_photo(upright[first_of(labels, names, "3")], np.random.default_rng(3))
    stages = preprocessing_stages(photo)
    panels = [("the photo", stages["input"]), ("the paper's level", stages["paper"]),
              ("the ink (paper removed, Otsu)", stages["ink"]), ("what the model reads (28x28)", preprocess(photo))]
    figure = Figure(figsize=(12, 3.4))
    for i, (title, image) in enumerate(panels):
        axes = figure.add_subplot(1, 4, i + 1)
        axes.imshow(image, cmap="gray", vmin=0, vmax=255 if i < 2 else None)
        axes.set_title(title, fontsize=10)
        axes.axis("off")
    save_figure(figure, os.path.join(ROOT, "docs", "preprocessing.png"))
    print(f"wrote {out} and docs/preprocessing.png")


if __name__ == "__main__":
    main()
