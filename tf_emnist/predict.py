"""Predict characters in image files: reading inputs safely, a model from any source, the JSON answer."""
from __future__ import annotations

import logging
import os

import numpy as np

from tf_emnist.preprocess import Character, ImageError, ImageTooLarge, UnreadableImage, preprocess, segment_line

MAX_PIXELS = 50_000_000  # larger images are refused (a decompression bomb, or not one character)
MAX_INSTANCES = 4096  # characters one .npy input may hold
DEFAULT_TOP_K = 3  # the characters an answer lists, unless asked

log = logging.getLogger("tf_emnist")


def read_image(source, name: str | None = None) -> np.ndarray:
    """A grayscale float array (0-255) of an image file (a path, bytes, or a binary file object).

    The pixels are turned as the file's EXIF orientation says (phones store photos rotated and
    say so); every mode Pillow reads becomes the same grey levels (`grey_levels`).
    """
    import io
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    name = name or str(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is too large for one "
                                        f"character (at most {MAX_PIXELS // 1_000_000} megapixels); crop or scale "
                                        "it down")
                image.load()
                return grey_levels(ImageOps.exif_transpose(image))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"{name}: too many pixels for one character (a decompression bomb?); "
                            "crop or scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UnreadableImage(f"{name}: not a readable image ({e.__class__.__name__}); "
                              "give a PNG or JPEG of a character") from None


WIDE_MODES = {"I": 65535.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "F": 1.0}


def grey_levels(image) -> np.ndarray:
    """Any Pillow image -> float grey levels 0-255: 16- and 32-bit integer images scaled from their range
    (0-65535), float images from 0-1, palettes, CMYK and colour converted to luminance. Transparent
    drawings read their alpha channel as the ink, so dark or light strokes on a transparent background
    both work."""
    if image.mode in WIDE_MODES:
        values = np.asarray(image, np.float32)
        top = max(WIDE_MODES[image.mode], float(values.max()) if values.size else 0.0)
        return np.clip(values / top * 255.0, 0, 255)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        alpha = np.asarray(rgba.getchannel("A"), np.float32)
        if alpha.min() < 128:  # really transparent: the drawn pixels are the opaque ones
            return 255.0 - alpha
        image = rgba
    return np.asarray(image.convert("L"), np.float32)


def read_npy(path: str) -> np.ndarray:
    """uint8 [N, 28, 28] upright images from a .npy file."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UnreadableImage(f"{path}: not a readable .npy file ({e.__class__.__name__})") from None
    if arrays.ndim == 2:
        arrays = arrays[None]
    if arrays.ndim != 3 or arrays.shape[1:] != (28, 28) or arrays.dtype != np.uint8 or not 0 < len(arrays) <= MAX_INSTANCES:
        raise ImageError(f"{path}: expected uint8 [N, 28, 28] upright images with 1 <= N <= {MAX_INSTANCES}, "
                         f"got {arrays.dtype} {arrays.shape}")
    return arrays


def read_inputs(path: str, segment: bool = False) -> list[Character]:
    """The characters of one input file: a .npy of arrays, an image of one character, or with
    `segment` an image of a line of characters. An image that looks like a line, read as one
    character, gets a one-line note that suggests --segment."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if path.endswith(".npy"):
        return [Character((0, 0, 28, 28), image) for image in read_npy(path)]
    gray = read_image(path)
    characters = characters_in(gray, path, segment)
    if not segment and (count := line_length(gray)) > 1:
        log.warning("note: %s looks like a line of %d characters, read here as one; add --segment to read each",
                    path, count)
    return characters


def line_length(gray: np.ndarray) -> int:
    """How many characters a wide image holds side by side (1 for an image about as wide as tall)."""
    if gray.shape[1] < 2 * gray.shape[0]:
        return 1
    try:
        return len(segment_line(gray))
    except ImageError:
        return 1


def characters_in(gray: np.ndarray, name: str, segment: bool = False) -> list[Character]:
    """One character (the whole image), or with `segment` each character of a line."""
    try:
        if segment:
            return segment_line(gray)
        return [Character((0, 0, gray.shape[1], gray.shape[0]), preprocess(gray))]
    except ImageError as e:
        raise type(e)(f"{name}: {e}") from None


def describe(name: str, characters: list[Character], top: list[list[tuple[str, float]]], segment: bool) -> dict:
    """The JSON answer for one input, as `predict --json` and `serve`'s /predict give it."""
    def ranked(choices):
        return [{"character": c, "probability": round(p, 6)} for c, p in choices]

    if not segment:
        return {"input": name, "top": ranked(top[0])}
    best = [choices[0][0] for choices in top]
    # Characters join into a string; class names of several letters ("digit") are spaced.
    text = ("" if all(len(c) == 1 for c in best) else " ").join(best)
    return {"input": name, "text": text,
            "characters": [{"box": list(ch.box), "top": ranked(choices)} for ch, choices in zip(characters, top)]}


class Predictor:
    """Classifies upright uint8 images with any model tf_emnist.sources reads: an export (SavedModel or
    TFLite), a run directory's model, a folder of versions."""

    def __init__(self, path: str):
        from tf_emnist.sources import load_source

        self.source = load_source(path)
        self.class_names = self.source.class_names

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.source.outputs(np.ascontiguousarray(images, np.uint8))

    def top_k(self, images: np.ndarray, k: int | None = None) -> list[list[tuple[str, float]]]:
        """For each image, the k most likely characters with their probabilities (default: 3, or every
        class of a task with fewer)."""
        return top_k(self(images)["probabilities"], self.class_names, k or min(DEFAULT_TOP_K, len(self.class_names)))


def top_k(probabilities: np.ndarray, class_names, k: int) -> list[list[tuple[str, float]]]:
    """For each row of probabilities, the k most likely classes with their probabilities."""
    if not 1 <= k <= len(class_names):
        raise ValueError(f"top k must be between 1 and {len(class_names)}, got {k}")
    best = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(class_names[c], float(p[c])) for c in row] for row, p in zip(best, probabilities)]
