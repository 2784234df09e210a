"""Predict characters in image files: reading inputs safely, a model from any source, the JSON answer."""
from __future__ import annotations

import os

import numpy as np

from tf_emnist.preprocess import Character, ImageError, preprocess, segment_line

MAX_PIXELS = 50_000_000  # larger images are refused (a decompression bomb, or not one character)
MAX_INSTANCES = 4096  # characters one .npy input may hold


def read_image(source, name: str | None = None) -> np.ndarray:
    """A grayscale float array of an image file (a path, bytes, or a binary file object).

    Transparent drawings read their alpha channel as the ink, so dark or light strokes on a
    transparent background both work.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    name = name or str(source)
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise ImageError(f"{name}: {image.width}x{image.height} pixels is too large for one character "
                                     f"(at most {MAX_PIXELS // 1_000_000} megapixels); crop or scale it down")
                image.load()
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    rgba = image.convert("RGBA")
                    alpha = np.asarray(rgba.getchannel("A"), np.float32)
                    if alpha.min() < 128:  # really transparent: the drawn pixels are the opaque ones
                        return 255.0 - alpha
                    image = rgba
                return np.asarray(image.convert("L"), np.float32)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f"{name}: too many pixels for one character (a decompression bomb?); "
                         "crop or scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{name}: not a readable image ({e.__class__.__name__}); "
                         "give a PNG or JPEG of a character") from None


def read_npy(path: str) -> np.ndarray:
    """uint8 [N, 28, 28] upright images from a .npy file."""
    try:
        arrays = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ImageError(f"{path}: not a readable .npy file ({e.__class__.__name__})") from None
    if arrays.ndim == 2:
        arrays = arrays[None]
    if arrays.ndim != 3 or arrays.shape[1:] != (28, 28) or arrays.dtype != np.uint8 or not 0 < len(arrays) <= MAX_INSTANCES:
        raise ImageError(f"{path}: expected uint8 [N, 28, 28] upright images with 1 <= N <= {MAX_INSTANCES}, "
                         f"got {arrays.dtype} {arrays.shape}")
    return arrays


def read_inputs(path: str, segment: bool = False) -> list[Character]:
    """The characters of one input file: a .npy of arrays, an image of one character, or with
    `segment` an image of a line of characters."""
    if not os.path.isfile(path):
        raise ImageError(f"{path}: no such file")
    if path.endswith(".npy"):
        return [Character((0, 0, 28, 28), image) for image in read_npy(path)]
    return characters_in(read_image(path), path, segment)


def characters_in(gray: np.ndarray, name: str, segment: bool = False) -> list[Character]:
    """One character (the whole image), or with `segment` each character of a line."""
    try:
        if segment:
            return segment_line(gray)
        return [Character((0, 0, gray.shape[1], gray.shape[0]), preprocess(gray))]
    except ImageError as e:
        raise ImageError(f"{name}: {e}") from None


def describe(name: str, characters: list[Character], top: list[list[tuple[str, float]]], segment: bool) -> dict:
    """The JSON answer for one input, as `predict --json` and `serve`'s /predict give it."""
    def ranked(choices):
        return [{"character": c, "probability": round(p, 6)} for c, p in choices]

    if not segment:
        return {"input": name, "top": ranked(top[0])}
    return {"input": name, "text": "".join(choices[0][0] for choices in top),
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

    def top_k(self, images: np.ndarray, k: int = 3) -> list[list[tuple[str, float]]]:
        """For each image, the k most likely characters with their probabilities."""
        return top_k(self(images)["probabilities"], self.class_names, k)


def top_k(probabilities: np.ndarray, class_names, k: int) -> list[list[tuple[str, float]]]:
    """For each row of probabilities, the k most likely classes with their probabilities."""
    if not 1 <= k <= len(class_names):
        raise ValueError(f"top k must be between 1 and {len(class_names)}, got {k}")
    best = np.argsort(-probabilities, axis=1)[:, :k]
    return [[(class_names[c], float(p[c])) for c in row] for row, p in zip(best, probabilities)]
