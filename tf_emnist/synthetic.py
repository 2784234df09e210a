"""Photo-like renderings of EMNIST characters: how a phone sees handwriting on paper, for robustness checks."""
from __future__ import annotations

import io

import numpy as np


def render_photo(characters, rng: np.random.Generator, *, scale: int = 4, gap: float = 0.6) -> np.ndarray:
    """Upright uint8 [28, 28] characters (light on dark, as EMNIST) -> a grey uint8 photo of them on paper.

    One character, or several written apart on one line. The photo has uneven lighting
    (a gradient and a soft shadow), grey ballpoint ink, a small tilt, sensor noise, a
    slight blur and JPEG compression.
    """
    from PIL import Image
    from scipy import ndimage

    characters = np.asarray(characters)
    if characters.ndim == 2:
        characters = characters[None]
    size = 28 * scale
    step = int(size * (1 + gap))
    margin = size // 2
    height, width = size + 2 * margin, step * (len(characters) - 1) + size + 2 * margin
    ink = np.zeros((height, width), np.float32)
    for i, image in enumerate(characters):
        big = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC), np.float32) / 255
        x = margin + i * step + int(rng.integers(-size // 10, size // 10 + 1))
        y = margin + int(rng.integers(-size // 10, size // 10 + 1))
        ink[y:y + size, x:x + size] = np.maximum(ink[y:y + size, x:x + size], np.clip(big, 0, 1))
    ink = ndimage.rotate(ink, rng.uniform(-6, 6), reshape=False, order=1)

    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * cols / width + np.sin(angle) * rows / height)
    paper = rng.uniform(175, 225) + rng.uniform(25, 50) * (ramp - ramp.mean())
    edge = rng.uniform(0.2, 0.8) * width
    shadow = 1 / (1 + np.exp(-(cols - edge) / (0.05 * width)))  # a soft shadow over one side
    paper = paper * (1 - rng.uniform(0.15, 0.3) * shadow)
    pen = rng.uniform(50, 110)  # grey ballpoint, not black
    photo = paper * (1 - ink) + pen * ink
    photo = ndimage.gaussian_filter(photo, rng.uniform(0.6, 1.2))
    photo += rng.normal(0, rng.uniform(3, 7), photo.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(photo, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=int(rng.integers(60, 86)))
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def render_scan(character: np.ndarray, scale: int = 4) -> np.ndarray:
    """A clean scan of one upright EMNIST character: dark ink on white paper, scaled up."""
    from PIL import Image

    size = 28 * scale
    big = np.asarray(Image.fromarray(character).resize((size, size), Image.Resampling.BICUBIC))
    return np.pad(255 - big, size // 2, constant_values=255)
