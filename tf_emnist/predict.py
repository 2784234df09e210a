"""Predict characters in image files: EMNIST-style preprocessing and a model from any source."""
from __future__ import annotations

import os

import numpy as np


BORDER = 2  # pixels of padding around the centred character, as in the EMNIST paper


class ImageError(ValueError):
    """An input file is not a usable character image (message: one line)."""


def emnist_like(gray: np.ndarray) -> np.ndarray:
    """One character image, any size, either polarity -> EMNIST-like upright uint8 [28, 28].

    The EMNIST paper's conversion: Gaussian blur (sigma 1), crop to the region of
    interest, centre in a square frame keeping the aspect ratio, downsample (bicubic) so
    that a 2-pixel border makes 28x28, scale the intensities to 0..255. Ink ends up light on
    dark; dark ink on light paper (the border is bright) is inverted first.
    """
    from PIL import Image

    img = np.asarray(gray, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {img.shape}")
    if np.median(_border(img)) > (img.max() + img.min()) / 2:  # light paper: make the ink bright
        img = img.max() - img
    img = np.clip(img - np.median(_border(img)), 0, None)  # the paper's level to 0
    if img.max() < 8:  # flat paper, nothing written
        raise ImageError("the image is blank (no character found)")
    blurred = gaussian_blur(img, sigma=1.0)
    rows, cols = np.nonzero(blurred > 0.1 * blurred.max())
    roi = blurred[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    side = max(roi.shape)
    frame = np.zeros((side, side), np.float32)
    top, left = (side - roi.shape[0]) // 2, (side - roi.shape[1]) // 2
    frame[top: top + roi.shape[0], left: left + roi.shape[1]] = roi
    inner = 28 - 2 * BORDER  # real EMNIST images keep their outer 2 pixel rows and columns empty
    small = np.asarray(Image.fromarray(frame).resize((inner, inner), Image.Resampling.BICUBIC), np.float32)
    small = np.pad(np.clip(small, 0, None), BORDER)
    return np.round(255 * small / small.max()).astype(np.uint8)


def gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur, edges padded with zeros (the background)."""
    radius = int(3 * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-(x**2) / (2 * sigma**2))
    kernel /= kernel.sum()
    padded = np.pad(img, radius)
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="valid")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="valid").astype(np.float32)


def _border(img: np.ndarray) -> np.ndarray:
    return np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])


def read_inputs(path: str) -> np.ndarray:
    """uint8 [N, 28, 28] upright images from a PNG/JPEG (one character) or a .npy of arrays."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if path.endswith(".npy"):
        try:
            arrays = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ImageError(f"{path}: not a readable .npy file ({e})") from None
        if arrays.ndim == 2:
            arrays = arrays[None]
        if arrays.ndim != 3 or arrays.shape[1:] != (28, 28) or arrays.dtype != np.uint8:
            raise ImageError(f"{path}: expected uint8 [N, 28, 28] upright images, got {arrays.dtype} {arrays.shape}")
        return arrays
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or "transparency" in image.info:
                # Transparent ink drawings: composite onto white paper.
                background = Image.new("RGBA", image.size, "white")
                image = Image.alpha_composite(background, image.convert("RGBA"))
            gray = np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path}: not a readable image ({e.__class__.__name__}); give a PNG or JPEG of one character") from None
    try:
        return emnist_like(gray)[None]
    except ImageError as e:
        raise ImageError(f"{path}: {e}") from None


class Predictor:
    """Classifies upright uint8 images with an export (SavedModel or TFLite) or a run directory's model."""

    def __init__(self, path: str):
        from tf_emnist.export import load_source

        source = load_source(path)
        self.serve = source.serving_function(stored_orientation=False)
        self.class_names = list(source.task.class_names)

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        out = self.serve(images=np.ascontiguousarray(images, np.uint8))
        return {k: np.asarray(v) for k, v in out.items()}

    def top_k(self, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, the k most likely characters with their probabilities."""
        probabilities = self(images)["probabilities"]
        best = np.argsort(-probabilities, axis=1)[:, :k]
        return [[(self.class_names[c], float(p[c])) for c in row] for row, p in zip(best, probabilities)]
