"""`predict`: image files, .npy arrays and lines of characters read by any model, bad inputs skipped."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_cli
from tests.test_train import _bad_files
from tf_emnist.export import export_model
from tf_emnist.predict import read_inputs
from tf_emnist.preprocess import preprocess


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


def draw_glyph() -> np.ndarray:
    """An EMNIST-like 28x28 upright 'A', light on dark."""
    canvas = Image.new("L", (120, 120), 0)
    ImageDraw.Draw(canvas).text((25, 10), "A", fill=255, font_size=90)
    return preprocess(np.asarray(canvas))


def save_png(array: np.ndarray, path) -> str:
    Image.fromarray(array).save(path)
    return str(path)


def test_preprocessing_makes_variants_look_like_the_28x28_array(tmp_path):
    base = draw_glyph()
    assert base.shape == (28, 28) and base.dtype == np.uint8 and base.max() == 255
    assert base[:2].max() == base[-2:].max() == base[:, :2].max() == base[:, -2:].max() == 0  # the border
    big = np.asarray(Image.fromarray(base).resize((140, 140), Image.Resampling.BICUBIC))
    off_centre = np.zeros((300, 220), np.uint8)
    off_centre[20:160, 70:210] = big
    variants = {
        "light_on_dark.png": big,
        "dark_on_light.png": 255 - big,
        "larger_canvas_off_centre.png": 255 - off_centre,
    }
    for name, array in variants.items():
        seen = read_inputs(save_png(array, tmp_path / name))[0].image
        difference = np.abs(seen.astype(int) - base.astype(int)).mean()
        assert difference < 12, (name, difference)


def test_predict_cli_images_npy_and_bad_files(run_dir, tmp_path, capsys):
    base = draw_glyph()
    big = np.asarray(Image.fromarray(base).resize((112, 112), Image.Resampling.BICUBIC))
    canvas = np.full((260, 200), 255, np.uint8)
    canvas[100:212, 10:122] = 255 - big  # dark ink, light paper, off centre
    files = [save_png(big, tmp_path / "a.png"), save_png(canvas, tmp_path / "b.png")]
    np.save(tmp_path / "batch.npy", np.stack([base, base]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    save_png(np.full((40, 40), 250, np.uint8), tmp_path / "blank.png")
    export = export_model(run_dir, str(tmp_path / "models"))
    inputs = [*files, tmp_path / "batch.npy", tmp_path / "broken.png", tmp_path / "blank.png"]

    code = run_cli("predict", export, *inputs, "--json", "--top-k", 2)
    captured = capsys.readouterr()
    assert code == 1  # some inputs failed; the rest were still predicted
    results = json.loads(captured.out)
    assert [r["input"] for r in results] == [*files, f"{tmp_path / 'batch.npy'}[0]", f"{tmp_path / 'batch.npy'}[1]"]
    assert all(len(r["top"]) == 2 for r in results)
    top = {r["top"][0]["character"] for r in results}
    assert len(top) == 1  # the PNGs are classified as the 28x28 array itself
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2 and "broken.png: not a readable image" in errors[0] and "blank" in errors[1]

    assert run_cli("predict", run_dir, files[0]) == 0  # a run directory works too
    assert top.pop() in capsys.readouterr().out


def test_an_empty_npy_is_skipped_with_one_line(capsys, tmp_path):
    root = _bad_files(tmp_path)
    assert run_cli("predict", os.path.join(os.path.dirname(__file__), "..", "saved_models", "merged-tflite"),
                   root / "empty.npy") == 1
    err = capsys.readouterr().err.strip()
    assert "empty.npy: not a readable .npy file" in err and len(err.splitlines()) == 1, err
