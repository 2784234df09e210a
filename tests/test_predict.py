"""`predict`: image files, .npy arrays and lines of characters read by any model, bad inputs skipped."""
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import run_cli, shipped
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
    assert run_cli("predict", shipped("merged-tflite"),
                   root / "empty.npy") == 1
    err = capsys.readouterr().err.strip()
    assert "empty.npy: not a readable .npy file" in err and len(err.splitlines()) == 1, err


def test_exif_orientation_turns_a_phone_photo_upright():
    import io

    upright = np.zeros((60, 40), np.uint8)
    upright[5:20, 5:35] = 255  # a bar near the top: rotated, it would sit at a side
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # pixels as a phone stores them
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to view
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    from tf_emnist.predict import read_image

    seen = read_image(buffer.getvalue(), "phone.png")
    assert seen.shape == upright.shape
    np.testing.assert_allclose(seen, upright, atol=1)


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "P", "CMYK", "LA", "RGB"])
def test_every_mode_and_bit_depth_reads_as_the_same_grey_levels(mode, tmp_path):
    from tf_emnist.predict import read_image

    grey = draw_glyph()
    big = np.asarray(Image.fromarray(grey).resize((84, 84), Image.Resampling.BICUBIC))
    if mode == "I;16":
        image = Image.fromarray(big.astype(np.uint16) * 257)  # 16 bits: 0-65535
    elif mode == "I":
        image = Image.fromarray(big.astype(np.int32) * 257)
    elif mode == "F":
        image = Image.fromarray(big.astype(np.float32) / 255)
    elif mode == "LA":
        image = Image.fromarray(np.stack([big, np.full_like(big, 255)], -1), "LA")
    else:
        image = Image.fromarray(big).convert(mode)
    assert image.mode == mode
    path = tmp_path / ("image.tiff" if mode in ("I", "F", "CMYK") else "image.png")
    image.save(path)
    np.testing.assert_allclose(read_image(str(path)), big, atol=2)


@pytest.fixture(scope="module")
def digit_letter_run(tmp_path_factory):
    from tests.conftest import write_nist_folder
    from tf_emnist.config import TrainConfig
    from tf_emnist.training import train

    root = tmp_path_factory.mktemp("digit-letter")
    config = TrainConfig(task="digit-letter", data_dir=write_nist_folder(root / "nist"), epochs=1, hidden_dim=8,
                         num_layers=1, batch_size=32, jit_compile=False)
    train(config, str(root / "run"), verbose=0)
    return str(root / "run")


def test_a_two_class_model_answers_with_its_defaults_and_spaces_its_class_names(digit_letter_run, tmp_path,
                                                                               capsys):
    line = np.full((60, 200), 255, np.uint8)
    for x in (20, 80, 140):
        line[15:45, x:x + 8] = 30  # three bars written apart
    path = save_png(line, tmp_path / "line.png")
    assert run_cli("predict", digit_letter_run, path, "--json") == 0  # the default top-k: both classes
    answer = json.loads(capsys.readouterr().out)[0]
    assert len(answer["top"]) == 2
    assert run_cli("predict", digit_letter_run, path, "--json", "--segment") == 0
    text = json.loads(capsys.readouterr().out)[0]["text"]
    assert len(text.split(" ")) == 3 and set(text.split(" ")) <= {"digit", "letter"}
    assert run_cli("predict", digit_letter_run, path, "--top-k", 3) == 2  # asked for: refused
    assert "top k must be between 1 and 2, got 3" in capsys.readouterr().err


def test_a_line_read_as_one_character_gets_a_note_suggesting_segment(run_dir, tmp_path, caplog):
    line = np.full((60, 260), 255, np.uint8)
    for x in (20, 80, 140, 200):
        line[15:45, x:x + 8] = 30
    path = save_png(line, tmp_path / "line.png")
    assert run_cli("predict", run_dir, path) == 0
    assert "looks like a line of 4 characters" in caplog.text and "--segment" in caplog.text
    caplog.clear()
    assert run_cli("predict", run_dir, save_png(draw_glyph(), tmp_path / "one.png")) == 0
    assert "looks like a line" not in caplog.text


@pytest.mark.parametrize("kind, record", [("tflite", True), ("tflite", False), ("savedmodel", True),
                                          ("savedmodel", False)])
def test_a_damaged_export_gets_one_line_everywhere_it_is_read(run_dir, tmp_path, capsys, kind, record):
    """A truncated model.tflite crashed TFLite's interpreter; a truncated SavedModel gave a traceback."""
    import shutil

    path = export_model(run_dir, str(tmp_path / "models"), format=kind)
    victim = os.path.join(path, "model.tflite" if kind == "tflite" else "variables/variables.data-00000-of-00001")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    info = os.path.join(path, "assets.extra", "export.json")
    if not record:  # an export written before tf-emnist recorded its files
        json.dump({"format": kind}, open(info, "w"))
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), np.uint8))
    for args in (["predict", path, tmp_path / "x.npy"], ["evaluate", path, "--output", tmp_path / "e"],
                 ["export", path, run_dir, "--output", tmp_path / "again"], ["serve", path, "--port", 1]):
        assert run_cli(*args) == 2, args
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("damaged" in err or "not a valid TFLite model" in err), err
    shutil.rmtree(tmp_path / "models")
