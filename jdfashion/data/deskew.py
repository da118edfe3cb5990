"""Deskewing consumer photos: the tilt read from the photo's own edges, turned back before the resize.

Shop images are upright; consumer photos are taken at a slant. Packages, shelves and print are
mostly straight lines, so the dominant edge direction, folded modulo 90 degrees (a horizontal and a
vertical edge say the same), gives the tilt. Only a central disc is read, so the frame's border and
any fill around a turned photo never vote. Measured on the Grocery protocol (docs/REALDATA.md,
'Deskewing the queries'): the estimate follows a turn of the photo to within 1 degree (median) and
straightening the in-store photos raised the frozen network's rank-1 from 0.496 to 0.544.

A tilt beyond 45 degrees reads as its quarter-turn complement: a photo turned by 70 degrees comes
back turned by -20 + 90, which quarter-turn views (``--rotations 0,90,-90``) can catch.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import albumentations as A
import cv2
import numpy as np

# The disc read, as a share of the shorter side: for a square photo turned by any angle on a grown
# canvas (black corners), a disc of 0.3 of the canvas stays inside the photo.
WINDOW_RADIUS = 0.3
ANALYSIS_SIDE = 256  # the shorter side the edges are measured at: cheap, and the tilt does not depend on it
EDGE_BLUR = 1.0  # Gaussian sigma (pixels at ANALYSIS_SIDE) against JPEG blocks and sensor noise
MIN_TURN = 0.5  # degrees: a smaller tilt is left alone, its resampling would blur more than it straightens


def tilt(image: np.ndarray) -> float:
    """The photo's tilt in degrees, counter-clockwise positive, in (-45, 45]: turning it by minus
    this makes its dominant edges horizontal and vertical."""
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    gray = gray.astype(np.float32)
    scale = ANALYSIS_SIDE / min(gray.shape)
    gray = cv2.resize(
        gray, (round(gray.shape[1] * scale), round(gray.shape[0] * scale)), interpolation=cv2.INTER_AREA
    )
    gray = cv2.GaussianBlur(gray, (0, 0), EDGE_BLUR)
    dx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    dy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    # Each gradient votes with its magnitude for its direction times 4: directions 90 degrees apart agree.
    vote = np.sum(_window(*gray.shape) * np.hypot(dx, dy) * np.exp(4j * np.arctan2(dy, dx)))
    # Image rows grow downwards, so a counter-clockwise turn turns the gradients clockwise.
    angle = -math.degrees(np.angle(vote)) / 4
    return 45.0 if angle <= -45 else angle


@lru_cache(maxsize=8)
def _window(height: int, width: int) -> np.ndarray:
    """The central disc's weights, falling smoothly to 0 at its rim so the rim adds no edge; one per
    analysis shape (a dataset's photos mostly share one), not one per photo."""
    rows, cols = np.mgrid[0:height, 0:width]
    radius = np.hypot(rows - (height - 1) / 2, cols - (width - 1) / 2) / (WINDOW_RADIUS * min(height, width))
    window = np.where(radius < 1, np.cos(np.pi / 2 * radius) ** 2, 0.0)
    window.setflags(write=False)
    return window


class Deskew(A.ImageOnlyTransform):
    """Turn the photo back by its :func:`tilt` at its own resolution (bicubic) and cut it to the
    largest upright box inside the turned frame, so no fill enters the features."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        angle = -tilt(img)
        if abs(angle) < MIN_TURN:
            return img
        turn = A.Rotate(
            limit=(angle, angle),
            interpolation=cv2.INTER_CUBIC,
            border_mode=cv2.BORDER_REFLECT_101,
            crop_border=True,
            p=1.0,
        )
        return turn(image=img)["image"]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()
