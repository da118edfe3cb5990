from __future__ import annotations

import itertools

import pytest
import torch

from jdfashion.model.partition import BRANCH_SETS, PartPooling, part_labels, resolve_branches

SIZES = [(h, w) for h in range(1, 14) for w in range(1, 14)] + [
    (24, 24),
    (24, 12),
    (12, 24),
    (31, 17),
    (48, 36),
]


def sizes_for(count: int) -> list[tuple[int, int]]:
    return [(h, w) for h, w in SIZES if h >= count and w >= count]


def bounding_box(mask: torch.Tensor) -> tuple[int, int, int, int]:
    rows = mask.any(dim=1).nonzero().flatten()
    columns = mask.any(dim=0).nonzero().flatten()
    return int(rows.min()), int(rows.max()) + 1, int(columns.min()), int(columns.max()) + 1


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["horizontal", "vertical"])
def test_bands_are_contiguous_ordered_and_as_even_as_possible(kind: str, count: int) -> None:
    for height, width in sizes_for(count):
        labels = part_labels(f"{kind}-{count}", height, width)
        along = labels if kind == "horizontal" else labels.T
        assert labels.shape == (height, width)
        # Constant across the band direction, non-decreasing along it, every band present.
        assert (along == along[:, :1]).all()
        steps = along[1:, 0] - along[:-1, 0]
        assert ((steps == 0) | (steps == 1)).all()
        assert along[0, 0] == 0 and along[-1, 0] == count - 1
        sizes = torch.bincount(along[:, 0], minlength=count)
        length = along.shape[0]
        assert sizes.sum() == length
        assert (sizes >= 1).all() and sizes.max() - sizes.min() <= 1, (height, width, sizes)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_annular_rings_are_nested_central_rectangles(count: int) -> None:
    for height, width in sizes_for(count):
        labels = part_labels(f"annular-{count}", height, width)
        assert labels.min() == 0 and labels.max() == count - 1
        previous = None
        for ring in range(count):
            inside = labels <= ring
            top, bottom, left, right = bounding_box(inside)
            # The union of rings 0..k fills its bounding box: a rectangle.
            assert inside[top:bottom, left:right].all() and inside.sum() == (bottom - top) * (right - left)
            # It covers k/n of each side to within a cell, and is exactly concentric wherever the side
            # is long enough for equal margins (>= 2n - 1 cells); else nested within half a cell.
            assert abs((bottom - top) - (ring + 1) * height / count) <= 1
            assert abs((right - left) - (ring + 1) * width / count) <= 1
            assert top == height - bottom if height >= 2 * count - 1 else abs(top - (height - bottom)) <= 1
            assert left == width - right if width >= 2 * count - 1 else abs(left - (width - right)) <= 1
            # Every ring holds at least one cell: each rectangle strictly contains the previous one.
            if previous is not None:
                assert inside.sum() > previous.sum() and inside[previous].all()
            previous = inside
        assert previous.all()


def test_global_is_the_whole_map() -> None:
    assert (part_labels("global", 5, 3) == 0).all()


def test_each_cell_in_exactly_one_part_of_each_branch() -> None:
    pooling = PartPooling(BRANCH_SETS["all"])
    offsets = torch.tensor([0, 1, 3, 6, 8, 11, 13, 16])
    for height, width in sizes_for(3):
        _, averaging = pooling.layout(height, width, torch.device("cpu"))
        membership = averaging > 0
        assert membership.shape == (height * width, 16)
        for start, stop in itertools.pairwise(offsets.tolist()):
            assert (membership[:, start:stop].sum(dim=1) == 1).all()
        assert membership.any(dim=0).all()


def test_minimum_map_size_is_enforced_with_a_clear_message() -> None:
    with pytest.raises(ValueError, match=r"'annular-3'.*got 2x5"):
        part_labels("annular-3", 2, 5)
    with pytest.raises(ValueError, match=r"'vertical-2'.*got 9x1"):
        part_labels("vertical-2", 9, 1)
    assert part_labels("horizontal-3", 3, 1).flatten().tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match=r"'horizontal-3'.*got 2x8"):
        PartPooling(BRANCH_SETS["all"])(torch.zeros(1, 2, 2, 8))


def test_branch_sets_and_specs() -> None:
    assert {name: PartPooling(branches).num_parts for name, branches in BRANCH_SETS.items()} == {
        "global": 1,
        "horizontal": 6,
        "vertical": 6,
        "annular": 6,
        "all": 16,
    }
    assert all(branches[0] == "global" for branches in BRANCH_SETS.values())
    assert resolve_branches("all") == BRANCH_SETS["all"]
    assert resolve_branches(" global, annular-4 ") == ("global", "annular-4")
    for bad in ["radial-2", "annular-0", "vertical-", "horizontal-x", "annular-2,horizontal", ","]:
        with pytest.raises(ValueError):
            resolve_branches(bad)
    with pytest.raises(ValueError, match="twice"):
        resolve_branches("global,global")


def sliced_parts(x: torch.Tensor) -> list[torch.Tensor]:
    """Parts of global, horizontal-2, vertical-3, annular-2 on a 4x6 map, cut by hand: (B, C, cells) each."""
    flat = x.flatten(2)
    ring_mask = torch.ones(4, 6, dtype=torch.bool)
    # Inner rectangle: 2 of 4 rows from row 1; 6/2 = 3 columns would leave margins 1.5, so the
    # symmetric rounding takes 4 columns from column 1.
    ring_mask[1:3, 1:5] = False
    return [
        flat,
        x[:, :, 0:2].flatten(2),
        x[:, :, 2:4].flatten(2),
        x[:, :, :, 0:2].flatten(2),
        x[:, :, :, 2:4].flatten(2),
        x[:, :, :, 4:6].flatten(2),
        x[:, :, 1:3, 1:5].flatten(2),
        flat[:, :, ring_mask.flatten()],
    ]


BRANCHES = ("global", "horizontal-2", "vertical-3", "annular-2")


def test_average_matches_hand_computed_means() -> None:
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6) ** 1.5
    pooled = PartPooling(BRANCHES)(x)
    expected = torch.stack([part.mean(dim=2) for part in sliced_parts(x)], dim=2)
    assert pooled.shape == (2, 3, 8)
    torch.testing.assert_close(pooled, expected)


def test_max_and_gem_match_hand_computed_values() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 6, generator=generator, dtype=torch.float64)
    expected_max = torch.stack([part.amax(dim=2) for part in sliced_parts(x)], dim=2)
    torch.testing.assert_close(PartPooling(BRANCHES, mode="max")(x), expected_max)

    gem = PartPooling(BRANCHES, mode="gem", gem_p=3.0)
    positive = x.abs() + 0.1
    expected_gem = torch.stack([part.pow(3).mean(dim=2).pow(1 / 3) for part in sliced_parts(positive)], dim=2)
    torch.testing.assert_close(gem(positive).double(), expected_gem, rtol=1e-5, atol=1e-6)
    # GeM's p is learned: the loss reaches it.
    gem(positive).sum().backward()
    assert gem.gem_p.grad is not None and gem.gem_p.grad != 0


def test_average_gradient_reaches_every_cell() -> None:
    x = torch.randn(2, 4, 7, 5, requires_grad=True)
    PartPooling(BRANCH_SETS["all"])(x).sum().backward()
    assert (x.grad != 0).all()


def test_one_module_serves_any_input_size() -> None:
    pooling = PartPooling(BRANCH_SETS["all"], mode="max")
    for height, width in [(24, 24), (5, 9), (24, 24)]:
        x = torch.randn(1, 2, height, width)
        pooled = pooling(x)
        assert pooled.shape == (1, 2, 16)
        torch.testing.assert_close(pooled[:, :, 0], x.flatten(2).amax(dim=2))


def test_unknown_mode_is_rejected() -> None:
    with pytest.raises(ValueError, match="pooling mode"):
        PartPooling(("global",), mode="median")
