"""Part pooling: the branches of MGPA cut the backbone's last feature map into parts and pool each.

A branch is ``"global"`` (one part: the whole map), ``"horizontal-N"`` (N row bands, as PCB),
``"vertical-N"`` (N column bands) or ``"annular-N"`` (a central rectangle, then N-1 rectangular
rings around it). Every cell of the map belongs to exactly one part of each branch, for any map
with at least N rows (horizontal), N columns (vertical) or both (annular), so one model serves any
input size.

Rounding rule for bands: the k-th boundary of an N-way cut of a side of length L is
``round_half_up(k * L / N)``; bands are the cells between consecutive boundaries. Annular ring k
(k = 1..N, 1 = innermost) is a central rectangle minus the rectangle of ring k - 1. Its side is
rounded *symmetrically*: the size nearest ``k * L / N`` whose margin ``L - size`` is even (ties: the
larger), so every rectangle is exactly concentric, on odd and even sides alike (3 rings on a
9-cell side: 3, 7, 9; on a 14-cell side, 4.67 and 9.33 become 4 and 10: margins 5 and 2). A rectangle
of s cells starts at ``(L - s) / 2``. Where a side is too short for equal margins with strictly
nested rectangles (L < 2N - 1, e.g. 3 rings on 4 cells) the sizes fall back to
``round_half_up(k * L / N)``, starting at ``(L - s) // 2``: nested, within half a cell of centred.
Either way every band and every ring holds at least one cell for L >= N.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

BRANCH_KINDS = ("global", "horizontal", "vertical", "annular")

# The Table-1 ablation rows. Every row keeps the global branch; "all" is the paper's network:
# 7 branches, 1 + 2 + 3 + 2 + 3 + 2 + 3 = 16 parts.
BRANCH_SETS: dict[str, tuple[str, ...]] = {
    "global": ("global",),
    "horizontal": ("global", "horizontal-2", "horizontal-3"),
    "vertical": ("global", "vertical-2", "vertical-3"),
    "annular": ("global", "annular-2", "annular-3"),
    "all": ("global", "horizontal-2", "horizontal-3", "vertical-2", "vertical-3", "annular-2", "annular-3"),
}

POOLING_MODES = ("avg", "max", "gem")


def parse_branch(branch: str) -> tuple[str, int]:
    """``"annular-3"`` -> ``("annular", 3)``; ``"global"`` -> ``("global", 1)``."""
    if branch == "global":
        return "global", 1
    kind, _, count = branch.partition("-")
    if kind not in BRANCH_KINDS[1:] or not count.isdigit() or int(count) < 1:
        raise ValueError(
            f"unknown branch {branch!r}: expected 'global' or '<kind>-<N>' with kind in "
            f"{', '.join(BRANCH_KINDS[1:])} and N >= 1"
        )
    return kind, int(count)


def resolve_branches(spec: str) -> tuple[str, ...]:
    """A ``BRANCH_SETS`` key or a comma list of branch names -> validated branch names, no duplicates."""
    names = BRANCH_SETS.get(spec) or tuple(name.strip() for name in spec.split(",") if name.strip())
    if not names:
        raise ValueError(f"no branches in {spec!r}: use one of {', '.join(BRANCH_SETS)} or a comma list")
    for name in names:
        parse_branch(name)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"branch listed twice in {spec!r}: {', '.join(duplicates)}")
    return names


def _round_half_up_fraction(numerator: int, denominator: int) -> int:
    """round(numerator / denominator) with halves rounded up, in exact integer arithmetic."""
    return (2 * numerator + denominator) // (2 * denominator)


def _band_index(length: int, count: int) -> torch.Tensor:
    """Band index of each position along a side cut into ``count`` bands."""
    bounds = [_round_half_up_fraction(k * length, count) for k in range(count + 1)]
    sizes = torch.tensor([bounds[k + 1] - bounds[k] for k in range(count)])
    return torch.repeat_interleave(torch.arange(count), sizes)


def _centred_size(k: int, length: int, count: int) -> int:
    """The size nearest k * length / count (ties: the larger) whose margin length - size is even."""
    candidates = range(length % 2 or 2, length + 1, 2)  # same parity as length, >= 1
    return min(candidates, key=lambda size: (abs(size * count - k * length), -size))


def _ring_start_and_stop(length: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per ring k (1..count), the first and one-past-last position of its central rectangle on a side."""
    centred = [_centred_size(k, length, count) for k in range(1, count + 1)]
    if all(inner < outer for inner, outer in itertools.pairwise(centred)):
        sizes = torch.tensor(centred)
    else:  # too short a side for equal margins (length < 2 * count - 1): nested first
        sizes = torch.tensor([_round_half_up_fraction(k * length, count) for k in range(1, count + 1)])
    starts = (length - sizes) // 2
    return starts, starts + sizes


def part_labels(branch: str, height: int, width: int) -> torch.Tensor:
    """(height, width) map of each cell's part index within ``branch`` (0 = top/left/innermost)."""
    kind, count = parse_branch(branch)
    needs_rows = kind in ("horizontal", "annular")
    needs_columns = kind in ("vertical", "annular")
    if (needs_rows and height < count) or (needs_columns and width < count) or height < 1 or width < 1:
        raise ValueError(
            f"branch {branch!r} needs a feature map of at least {count if needs_rows else 1}x"
            f"{count if needs_columns else 1} (rows x columns); got {height}x{width}: "
            "use a larger input image or keep the backbone's last stage at stride 1"
        )
    if kind == "global":
        return torch.zeros(height, width, dtype=torch.long)
    if kind == "horizontal":
        return _band_index(height, count)[:, None].expand(height, width).clone()
    if kind == "vertical":
        return _band_index(width, count)[None, :].expand(height, width).clone()
    row_start, row_stop = _ring_start_and_stop(height, count)
    column_start, column_stop = _ring_start_and_stop(width, count)
    rows = torch.arange(height)[None, :, None]
    columns = torch.arange(width)[None, None, :]
    inside = (
        (rows >= row_start[:, None, None])
        & (rows < row_stop[:, None, None])
        & (columns >= column_start[:, None, None])
        & (columns < column_stop[:, None, None])
    )
    # The innermost rectangle containing a cell is its ring; the outermost rectangle is the whole map.
    return inside.int().argmax(dim=0)


class PartPooling(nn.Module):
    """(B, C, H, W) -> (B, C, P): one pooled vector per part, parts in branch order.

    The cell-to-part layout is built once per (H, W, device) and cached, so varying input sizes
    cost one small table each. ``gem`` pools ``mean(clamp(x, eps) ** p) ** (1 / p)`` with one
    learnable p shared by all parts (Radenović et al.), computed in float32 so AMP cannot overflow it.
    """

    def __init__(self, branches: tuple[str, ...] | list[str], mode: str = "avg", gem_p: float = 3.0) -> None:
        super().__init__()
        if mode not in POOLING_MODES:
            raise ValueError(f"unknown pooling mode {mode!r}: expected one of {', '.join(POOLING_MODES)}")
        self.branches = tuple(branches)
        for branch in self.branches:
            parse_branch(branch)
        self.parts_per_branch = tuple(parse_branch(branch)[1] for branch in self.branches)
        self.mode = mode
        self.gem_p = nn.Parameter(torch.tensor(float(gem_p))) if mode == "gem" else None
        self.gem_eps = 1e-6
        self._layouts: dict[tuple[int, int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_parts(self) -> int:
        return sum(self.parts_per_branch)

    def layout(self, height: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(branches, H*W) global part index of each cell, and the (H*W, P) cell-averaging matrix.

        Built outside inference mode: the cache is shared by validation (inference mode) and training
        (autograd), and an inference tensor cannot take part in a graph."""
        key = (height, width, device)
        if key not in self._layouts:
            with torch.inference_mode(False):
                self._layouts[key] = self._build_layout(height, width, device)
        return self._layouts[key]

    def _build_layout(
        self, height: int, width: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offsets = [0, *torch.tensor(self.parts_per_branch).cumsum(0).tolist()[:-1]]
        labels = torch.stack(
            [
                part_labels(branch, height, width).flatten() + offset
                for branch, offset in zip(self.branches, offsets, strict=True)
            ]
        )
        membership = F.one_hot(labels, self.num_parts).sum(dim=0).float()
        averaging = membership / membership.sum(dim=0, keepdim=True)
        return labels.to(device), averaging.to(device)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(f"expected a (B, C, H, W) feature map, got shape {tuple(features.shape)}")
        batch, channels, height, width = features.shape
        labels, averaging = self.layout(height, width, features.device)
        cells = features.flatten(2)
        if self.mode == "avg":
            return cells @ averaging.to(cells.dtype)
        if self.mode == "gem":
            with torch.autocast(features.device.type, enabled=False):
                powered = cells.float().clamp(min=self.gem_eps).pow(self.gem_p)
                return (powered @ averaging).pow(1.0 / self.gem_p).to(features.dtype)
        # max: one scatter-amax per branch; every part is non-empty, so no -inf survives.
        pooled = cells.new_full((batch, channels, self.num_parts), -math.inf)
        for branch_labels in labels:
            index = branch_labels.expand(batch, channels, -1)
            pooled = pooled.scatter_reduce(2, index, cells, reduce="amax", include_self=True)
        return pooled
