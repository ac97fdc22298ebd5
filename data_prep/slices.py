"""From a normalised (3, z, y, x) uint8 volume to the slices the model sees.

Steps, each a small function: pick tumour slices, find one square crop for the patient around the
tumour, fuse the phases as RGB (R = pre, G = early, B = late), cut and resize.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def tumour_slices(z_first: int, z_last: int, count: int) -> list[int]:
    """`count` consecutive slices centred on the tumour's extent z_first..z_last (inclusive).

    count = 0, or a tumour thinner than count, keeps every tumour slice.
    """
    extent = z_last - z_first + 1
    if count == 0 or count >= extent:
        return list(range(z_first, z_last + 1))
    start = z_first + (extent - count) // 2
    return list(range(start, start + count))


def in_plane_box(mask: np.ndarray, slices: list[int]) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), inclusive, bounding the tumour over the given slices of a (z, y, x) mask."""
    projection = mask[slices].any(axis=0)
    rows, cols = np.nonzero(projection.any(axis=1))[0], np.nonzero(projection.any(axis=0))[0]
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def square_window(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int]:
    """(top, left, side) of a square centred on the box, side = longer box side * (1 + 2 margin)."""
    y0, y1, x0, x1 = box
    longest = max(y1 - y0 + 1, x1 - x0 + 1)
    side = max(8, int(round(longest * (1 + 2 * margin))))
    centre_y, centre_x = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2
    return int(round(centre_y - side / 2)), int(round(centre_x - side / 2)), side


def fixed_window(box: tuple[int, int, int, int], side: int) -> tuple[int, int, int]:
    """(top, left, side) of a square of the given side centred on the box (a fixed field of
    view: the tumour keeps its size in pixels)."""
    y0, y1, x0, x1 = box
    centre_y, centre_x = (y0 + y1 + 1) / 2, (x0 + x1 + 1) / 2
    return int(round(centre_y - side / 2)), int(round(centre_x - side / 2)), int(side)


def cut(plane: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """The side x side window of a (y, x, ...) plane; parts outside the image are zero."""
    out = np.zeros((side, side) + plane.shape[2:], dtype=plane.dtype)
    y_from, x_from = max(top, 0), max(left, 0)
    y_to, x_to = min(top + side, plane.shape[0]), min(left + side, plane.shape[1])
    if y_from < y_to and x_from < x_to:
        out[y_from - top:y_to - top, x_from - left:x_to - left] = plane[y_from:y_to, x_from:x_to]
    return out


def fuse(phases: np.ndarray, z: int) -> np.ndarray:
    """Slice z of (3, z, y, x) phases as a (y, x, 3) RGB image: R = pre, G = early, B = late."""
    return np.ascontiguousarray(np.moveaxis(phases[:, z], 0, -1))


def resize(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """(side, side, C) uint8 -> (size, size, C); bilinear with antialiasing, or nearest for masks."""
    channels = image.shape[2]
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    planes = [np.asarray(Image.fromarray(image[..., c]).resize((size, size), mode))
              for c in range(channels)]
    return np.stack(planes, axis=-1)
