"""From a photo, scan or drawing of handwriting to the 28x28 images the model reads (EMNIST's framing)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BORDER = 2  # pixels of padding around the centred character, as in the EMNIST paper
SMALL = 64  # inputs smaller than this are EMNIST-sized arrays: flat paper, no photo to clean
MAX_SIDE = 512  # larger inputs are downscaled first: a character needs no more, and filters stay fast
MIN_CONTRAST = 24  # ink this close to the paper (of 255) is not writing
SPECK = 0.02  # components smaller than this fraction of the largest are noise


class ImageError(ValueError):
    """An input is not a usable character image (message: one line). `http_status`: what a server answers."""

    http_status = 422  # readable, but no character to read in it


class UnreadableImage(ImageError):
    """The bytes are not an image this reads."""

    http_status = 415


class ImageTooLarge(ImageError):
    """More pixels than one character needs (a decompression bomb, say)."""

    http_status = 413


@dataclass(frozen=True)
class Character:
    """One character found in an image: its box in the input's pixels (x0, y0, x1, y1) and the 28x28 view."""

    box: tuple[int, int, int, int]
    image: np.ndarray  # upright uint8 [28, 28], light ink on dark as EMNIST shows it


def preprocess(gray: np.ndarray) -> np.ndarray:
    """One character image (any size, either polarity, photo or scan) -> EMNIST-like upright uint8 [28, 28].

    The steps (see `ink_layer`): paper level estimated locally, so lighting gradients and
    shadows drop out; ink found by Otsu's threshold, keeping the strokes' grey levels;
    noise specks dropped; the character is the largest connected group of ink with the
    pieces near it (an i's dot, a broken stroke). Then the EMNIST paper's framing: Gaussian
    blur, crop, centre in a square, bicubic to 24x24, a 2-pixel border.
    """
    stages = preprocessing_stages(gray)
    if min(stages["input"].shape) < SMALL:
        return _frame_small(stages["input"] - stages["paper"] if stages["ink_is_light"] else
                            stages["paper"] - stages["input"])
    ink = stages["ink"]
    labels, boxes, areas = _components(ink)
    keep = _character_components(boxes, areas)
    return _frame(ink, labels, keep, boxes)


def segment_line(gray: np.ndarray) -> list[Character]:
    """The characters written apart on one line, left to right.

    Components whose columns overlap form one character, so a dotted or broken
    character stays whole; specks are dropped.
    """
    ink, scale = ink_layer(gray)
    labels, boxes, areas = _components(ink)
    kept = [i for i in range(len(areas)) if areas[i] >= SPECK * areas.max()]
    groups: list[list[int]] = []
    for i in sorted(kept, key=lambda i: boxes[i][1]):
        if groups:
            g_x0, g_x1 = min(boxes[j][1] for j in groups[-1]), max(boxes[j][3] for j in groups[-1])
            width = min(boxes[i][3] - boxes[i][1], g_x1 - g_x0)
            if min(g_x1, boxes[i][3]) - max(g_x0, boxes[i][1]) >= 0.5 * width:  # mostly above or below
                groups[-1].append(i)
                continue
        groups.append([i])
    characters = []
    for group in groups:
        y0, x0 = min(boxes[i][0] for i in group), min(boxes[i][1] for i in group)
        y1, x1 = max(boxes[i][2] for i in group), max(boxes[i][3] for i in group)
        box = tuple(int(round(v / scale)) for v in (x0, y0, x1, y1))
        characters.append(Character(box, _frame(ink, labels, group, boxes)))
    return characters


def ink_layer(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """Bright ink on a zero background, float32, and the scale applied to fit MAX_SIDE."""
    stages = preprocessing_stages(gray)
    return stages["ink"], stages["scale"]


def preprocessing_stages(gray: np.ndarray) -> dict:
    """The intermediate images of `ink_layer`: the (downscaled) input, the paper's level, the ink."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    img = np.asarray(gray, dtype=np.float32)
    if img.ndim != 2 or min(img.shape) < 2:
        raise ImageError(f"expected a 2-D grayscale image, got shape {img.shape}")
    img, scale = _fit(img)
    if min(img.shape) < SMALL:  # an EMNIST-sized array: flat paper, its level read from the border
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        paper = np.full_like(img, np.median(border))
        light = paper[0, 0] < (img.max() + img.min()) / 2
        ink = img - paper if light else paper - img
    else:
        ink, paper, light = _ink_on_uneven_paper(img)
    ink = np.clip(ink, 0, None)
    smooth = ndimage.gaussian_filter(ink, max(0.5, min(img.shape) / 256))
    if smooth.max() < MIN_CONTRAST:
        raise ImageError("the image is blank (no character found)")
    threshold = max(threshold_otsu(smooth), MIN_CONTRAST / 2)
    mask = ndimage.binary_dilation(smooth > threshold)  # keep the strokes' soft edges
    return {"input": img, "paper": paper, "ink": np.where(mask, ink, 0).astype(np.float32), "scale": scale,
            "ink_is_light": light}


def _ink_on_uneven_paper(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """(ink, the paper's local level, whether the ink is light): either polarity, the ink made bright.

    A grey opening (closing) wider than any stroke removes light (dark) strokes and keeps
    the lighting; computed at a coarse scale, where the paper has no detail to lose. The
    polarity is the one whose residue stands out more.
    """
    from PIL import Image
    from scipy import ndimage

    factor = max(1, max(img.shape) // 128)
    coarse = np.asarray(Image.fromarray(img).resize((img.shape[1] // factor, img.shape[0] // factor),
                                                    Image.Resampling.BOX), np.float32)
    size = max(3, min(coarse.shape) // 4)

    def full(a):
        a = ndimage.gaussian_filter(a, size / 4)
        return np.asarray(Image.fromarray(a).resize((img.shape[1], img.shape[0]), Image.Resampling.BILINEAR))

    dark_paper, light_paper = full(ndimage.grey_opening(coarse, size=(size, size))), full(
        ndimage.grey_closing(coarse, size=(size, size)))
    light_ink, dark_ink = img - dark_paper, light_paper - img
    if np.percentile(dark_ink, 99.8) > np.percentile(light_ink, 99.8):
        return dark_ink, light_paper, False
    return light_ink, dark_paper, True


def _fit(img: np.ndarray) -> tuple[np.ndarray, float]:
    from PIL import Image

    scale = min(1.0, MAX_SIDE / max(img.shape))
    if scale < 1.0:
        size = (max(2, round(img.shape[1] * scale)), max(2, round(img.shape[0] * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX), np.float32)
    return img, scale


def _components(ink: np.ndarray):
    """Connected groups of ink: a label image, each group's (y0, x0, y1, x1) and its area."""
    from scipy import ndimage

    labels, count = ndimage.label(ink > 0, structure=np.ones((3, 3)))
    if count == 0:
        raise ImageError("the image is blank (no character found)")
    slices = ndimage.find_objects(labels)
    boxes = [(s[0].start, s[1].start, s[0].stop, s[1].stop) for s in slices]
    areas = np.bincount(labels.ravel())[1:]
    return labels, boxes, areas


def _character_components(boxes, areas) -> list[int]:
    """The largest component and the sizeable ones near it (within half its size)."""
    main = int(np.argmax(areas))
    y0, x0, y1, x1 = boxes[main]
    reach = 0.5 * max(y1 - y0, x1 - x0)
    keep = []
    for i, (b_y0, b_x0, b_y1, b_x1) in enumerate(boxes):
        gap = max(b_y0 - y1, y0 - b_y1, b_x0 - x1, x0 - b_x1, 0)
        if i == main or (areas[i] >= SPECK * areas[main] and gap <= reach):
            keep.append(i)
    return keep


def _frame_small(ink: np.ndarray) -> np.ndarray:
    """An EMNIST-sized image (already a character, no noise to speak of): the paper's conversion as it
    is, a blur of sigma 1, the crop at a tenth of the peak, so an EMNIST image comes back nearly unchanged."""
    from scipy import ndimage

    blurred = ndimage.gaussian_filter(np.clip(ink, 0, None), 1.0, mode="constant")
    rows, cols = np.nonzero(blurred > 0.1 * blurred.max())
    return _square(blurred[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1])


def _square(roi: np.ndarray) -> np.ndarray:
    """Centre in a square, bicubic to 24x24, a 2-pixel border, intensities to 0-255."""
    from PIL import Image

    side = max(roi.shape)
    frame = np.zeros((side, side), np.float32)
    top, left = (side - roi.shape[0]) // 2, (side - roi.shape[1]) // 2
    frame[top: top + roi.shape[0], left: left + roi.shape[1]] = roi
    inner = 28 - 2 * BORDER
    small = np.asarray(Image.fromarray(frame).resize((inner, inner), Image.Resampling.BICUBIC), np.float32)
    small = np.pad(np.clip(small, 0, None), BORDER)
    if small.max() <= 0:
        raise ImageError("the image is blank (no character found)")
    return np.round(255 * small / small.max()).astype(np.uint8)


def _frame(ink: np.ndarray, labels: np.ndarray, keep: list[int], boxes) -> np.ndarray:
    """The EMNIST framing of the kept components: blur, crop, square, 24x24 bicubic, 2-pixel border."""
    from scipy import ndimage

    y0, x0 = min(boxes[i][0] for i in keep), min(boxes[i][1] for i in keep)
    y1, x1 = max(boxes[i][2] for i in keep), max(boxes[i][3] for i in keep)
    # The character's soft edge (dilated past the component) stays with it.
    pad = 2
    y0, x0 = max(0, y0 - pad), max(0, x0 - pad)
    y1, x1 = min(ink.shape[0], y1 + pad), min(ink.shape[1], x1 + pad)
    selected = np.isin(labels[y0:y1, x0:x1], np.asarray(keep) + 1)
    selected = ndimage.binary_dilation(selected, iterations=pad)
    roi = np.where(selected, ink[y0:y1, x0:x1], 0)
    return _square(ndimage.gaussian_filter(roi, max(0.5, max(roi.shape) / 128)))  # the paper's sigma 1 at 128 px
