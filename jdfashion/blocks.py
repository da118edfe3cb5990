"""Per-row transforms of feature arrays too large to copy whole in fp32 (a 154k-row fp16 gallery),
a block of rows at a time: domain centring, query augmentation, self-training's part map."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from jdfashion.search import Features, views

BLOCK_ROWS = 8192  # rows a per-row transform (centring, mapping) holds in fp32 at a time


def is_half(features: Features) -> bool:
    return features.dtype == (torch.float16 if isinstance(features, torch.Tensor) else np.float16)


def row_blocks(count: int) -> Iterator[np.ndarray]:
    """Consecutive blocks of at most ``BLOCK_ROWS`` row numbers covering ``range(count)``."""
    for start in range(0, count, BLOCK_ROWS):
        yield np.arange(start, min(start + BLOCK_ROWS, count))


def map_rows(features: Features, transform: Callable[[Features, np.ndarray], torch.Tensor]) -> torch.Tensor:
    """New features, ``transform(view, rows)`` block by block for each view of (N, D) or (V, N, D) ones.

    fp16 stays fp16, else fp32, and only a block is ever in fp32: a 154k-row fp16 gallery is never
    copied whole at double the size."""
    out = torch.empty(tuple(features.shape), dtype=torch.float16 if is_half(features) else torch.float32)
    for number, view in enumerate(views(features)):
        target = out[number] if features.ndim == 3 else out
        for rows in row_blocks(len(view)):
            target[int(rows[0]) : int(rows[-1]) + 1] = transform(view, rows).to(out.dtype)
    return out
