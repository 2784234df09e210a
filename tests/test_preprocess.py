"""Preprocessing of photos, scans and drawings, and segmentation of lines, on generated images."""
import io
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tf_emnist.predict import read_image
from tf_emnist.preprocess import ImageError, preprocess, segment_line
from tf_emnist.synthetic import render_photo, render_scan


def glyph(text: str = "A") -> np.ndarray:
    """An EMNIST-like 28x28 upright character, light on dark."""
    canvas = Image.new("L", (120, 120), 0)
    ImageDraw.Draw(canvas).text((25, 10), text, fill=255, font_size=90)
    return preprocess(np.asarray(canvas))


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Correlation of two 28x28 images (1: the same picture)."""
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.mark.parametrize("seed", range(6))
def test_a_photo_reads_like_a_scan_of_the_same_character(seed):
    base = glyph("A")
    photo = render_photo(base, np.random.default_rng(seed))  # gradient, shadow, grey ink, noise, blur, tilt, JPEG
    seen = preprocess(photo)
    assert similarity(seen, preprocess(render_scan(base))) > 0.75
    # The crop is the character, not the sheet: its ink fills the 24x24 frame inside the 2-pixel border.
    rows, cols = np.nonzero(seen > 64)
    assert seen[:2].max() == seen[-2:].max() == seen[:, :2].max() == seen[:, -2:].max() == 0
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) >= 20
    mass_y, mass_x = np.average(np.indices(seen.shape), axis=(1, 2), weights=seen.astype(float))
    assert 10 <= mass_y <= 18 and 10 <= mass_x <= 18


def test_the_old_failure_a_lit_sheet_with_a_small_character_is_found():
    sheet = np.full((600, 800), 200.0) + np.linspace(-60, 60, 800)[None, :]  # strong lighting gradient
    sheet[250:330, 380:392] = 90  # a short grey "1" in the middle
    seen = preprocess(sheet)
    rows, cols = np.nonzero(seen > 64)
    assert rows.max() - rows.min() >= 20  # the bar fills the frame's height: the crop is the character


@pytest.mark.parametrize("ink, background", [((0, 0, 0, 255), (0, 0, 0, 0)), ((255, 255, 255, 255), (0, 0, 0, 0)),
                                             ((0, 0, 0, 255), (255, 255, 255, 255))])
def test_canvas_drawings_read_alike_whatever_their_colours(ink, background):
    image = Image.new("RGBA", (280, 280), background)
    ImageDraw.Draw(image).line([(140, 40), (140, 240)], fill=ink, width=24)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    seen = preprocess(read_image(buffer.getvalue(), "drawing.png"))
    assert seen[4:24, 12:16].mean() > 150 and seen[:, :8].max() < 40  # a centred vertical bar


def test_light_on_dark_arrays_keep_their_look():
    base = glyph("R")
    assert similarity(preprocess(base), base) > 0.85  # re-framed, re-blurred: close, not identical


@pytest.mark.parametrize("count", [1, 3, 5])
def test_segmentation_finds_each_character_of_a_photographed_line(count):
    characters = [glyph(c) for c in "AbQ7i"[:count]]
    found = segment_line(render_photo(np.stack(characters), np.random.default_rng(count)))
    assert len(found) == count
    assert [c.box[0] for c in found] == sorted(c.box[0] for c in found)
    for character, seen in zip(characters, found):
        assert similarity(seen.image, character) > 0.6


def test_a_dotted_character_stays_one():
    line = np.full((80, 200), 255, np.uint8)
    line[35:70, 50:56] = 20  # i's stem
    line[20:27, 50:56] = 20  # its dot
    line[20:70, 120:126] = 20  # an l
    assert len(segment_line(line)) == 2


def test_blank_and_huge_inputs_fail_fast_with_one_line():
    with pytest.raises(ImageError, match="blank"):
        preprocess(np.full((300, 300), 230.0) + np.random.default_rng(0).normal(0, 2, (300, 300)))
    big = np.full((6000, 6000), 255, np.uint8)
    big[2000:4000, 2900:3100] = 0
    start = time.perf_counter()
    preprocess(big)  # downscaled first
    assert time.perf_counter() - start < 5
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000), 255).save(buffer, "PNG")
    with pytest.raises(ImageError, match="too many pixels"):
        read_image(buffer.getvalue(), "bomb.png")


@pytest.mark.real_data
def test_photos_of_real_test_characters_read_within_five_points_of_scans(real_data_dir):
    from tf_emnist.config import TrainConfig
    from tf_emnist.data import load_split
    from tests.conftest import shipped
    from tf_emnist.predict import Predictor
    from tf_emnist.tasks import get_task

    stored, labels = load_split(get_task("merged"), "test", TrainConfig(data_dir=real_data_dir, limit_test=300))
    upright = np.ascontiguousarray(stored.transpose(0, 2, 1))
    predictor = Predictor(shipped("merged-tflite"))
    rng = np.random.default_rng(0)
    scans = np.mean(predictor(np.stack([preprocess(render_scan(c)) for c in upright]))["class_ids"] == labels)
    photos = np.mean(predictor(np.stack([preprocess(render_photo(c, rng)) for c in upright]))["class_ids"] == labels)
    print(f"clean scans {scans:.1%}, photos {photos:.1%} of {len(labels)} real test characters")
    assert photos >= scans - 0.05
