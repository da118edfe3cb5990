"""The colour-histogram baseline: the floor a learned model must beat, and a run that needs no weights.

Each item crop becomes the square root of its normalised joint colour histogram, so the rows are unit
vectors whose dot product is the Bhattacharyya coefficient; unlike a plainly L2-normalised histogram,
this does not let the single largest bin (usually the background left in the box) dominate the score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from jdfashion.data.images import BoxError, ImageDecodeError, load_item
from jdfashion.data.jdformat import ImageRef

ColorSpace = Literal["hsv", "rgb"]
# OpenCV's 8-bit HSV keeps hue in [0, 180).
_RANGES: dict[str, list[int]] = {"hsv": [0, 180, 0, 256, 0, 256], "rgb": [0, 256, 0, 256, 0, 256]}


@dataclass(frozen=True)
class BaselineFeatures:
    """One row per input ref, in input order; a ref whose image could not be read has a zero row.

    Zero rows keep the id order intact and score 0 against everything, so they rank last rather than vanish.
    """

    features: np.ndarray
    failed: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


def color_histogram_features(
    refs: Sequence[ImageRef],
    image_root: Path,
    bins: int = 8,
    color_space: ColorSpace = "hsv",
    workers: int = 1,
    progress: Callable[[], None] | None = None,
) -> BaselineFeatures:
    """(N, bins**3) float32 features of the item crops; ``failed`` lists the URLs that could not be read.

    ``workers`` threads decode in parallel (PIL and OpenCV release the GIL); ``progress`` is called once
    per image, for a progress bar.
    """
    if not 1 <= bins <= 256:
        raise ValueError(f"bins must be in [1, 256], got {bins}")
    if color_space not in _RANGES:
        raise ValueError(f"color_space must be one of {sorted(_RANGES)}, got {color_space!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")

    def describe(ref: ImageRef) -> np.ndarray | str:
        try:
            crop = load_item(ref, image_root)
        except (ImageDecodeError, BoxError) as err:
            return str(err)
        return histogram_feature(crop, bins, color_space)

    features = np.zeros((len(refs), bins**3), dtype=np.float32)
    failed: list[str] = []
    reasons: list[str] = []
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for row, (ref, result) in enumerate(zip(refs, pool.map(describe, refs), strict=True)):
            if isinstance(result, str):
                failed.append(ref.url)
                reasons.append(result)
            else:
                features[row] = result
            if progress is not None:
                progress()
    return BaselineFeatures(features=features, failed=failed, reasons=reasons)


def histogram_feature(crop: np.ndarray, bins: int = 8, color_space: ColorSpace = "hsv") -> np.ndarray:
    """The unit-norm square-rooted joint histogram of one HxWx3 uint8 RGB crop."""
    pixels = cv2.cvtColor(crop, cv2.COLOR_RGB2HSV) if color_space == "hsv" else np.ascontiguousarray(crop)
    histogram = cv2.calcHist([pixels], [0, 1, 2], None, [bins] * 3, _RANGES[color_space]).ravel()
    return np.sqrt(histogram / histogram.sum()).astype(np.float32)
