"""The colour-histogram baseline on real image files: crop first, unit rows, failures reported in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdfashion.baseline import color_histogram_features, histogram_feature
from jdfashion.data.jdformat import Box, ImageRef


def save(root: Path, name: str, pixels: np.ndarray) -> str:
    """Write ``pixels`` losslessly under ``root`` and return the relative URL that names it."""
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(root / name)
    return name


def noisy_colour(rng: np.random.Generator, rgb: tuple[int, int, int], shape: tuple[int, int]) -> np.ndarray:
    """A textured patch around one colour, so the histogram spreads over neighbouring bins."""
    noise = rng.normal(0, 18, size=(*shape, 3))
    return np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)


def full(pixels: np.ndarray) -> Box:
    return Box(0, 0, pixels.shape[1], pixels.shape[0])


def test_same_item_in_different_surroundings_scores_one(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    item = noisy_colour(rng, (200, 60, 40), (30, 20))
    scenes = []
    for background in ((20, 200, 30), (240, 240, 240)):
        scene = noisy_colour(rng, background, (64, 80))
        scene[10:40, 25:45] = item
        scenes.append(scene)
    refs = [ImageRef(save(tmp_path, f"scene{i}.png", s), Box(25, 10, 45, 40)) for i, s in enumerate(scenes)]
    whole = [ImageRef(ref.url, full(scene)) for ref, scene in zip(refs, scenes, strict=True)]

    cropped = color_histogram_features(refs, tmp_path).features
    uncropped = color_histogram_features(whole, tmp_path).features
    assert cropped.shape == (2, 8**3) and cropped.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(cropped, axis=1), 1.0, rtol=1e-6)
    assert cropped[0] @ cropped[1] == pytest.approx(1.0, abs=1e-6)
    assert uncropped[0] @ uncropped[1] < 0.5  # the backgrounds differ, so the box is what made them equal


@pytest.mark.parametrize("color_space", ["hsv", "rgb"])
def test_red_and_blue_items_are_far_apart(tmp_path: Path, color_space: str) -> None:
    rng = np.random.default_rng(1)
    patches = {
        "red_a": noisy_colour(rng, (210, 30, 30), (40, 40)),
        "red_b": noisy_colour(rng, (190, 45, 35), (40, 40)),
        "blue": noisy_colour(rng, (30, 40, 200), (40, 40)),
    }
    refs = [ImageRef(save(tmp_path, f"{name}.png", p), full(p)) for name, p in patches.items()]
    red_a, red_b, blue = color_histogram_features(refs, tmp_path, bins=6, color_space=color_space).features
    assert red_a @ blue < 0.1
    assert red_a @ red_b > 0.6
    assert red_a.shape == (6**3,)


def test_unreadable_images_get_zero_rows_in_place_and_are_reported(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    good = [noisy_colour(rng, colour, (24, 24)) for colour in ((200, 40, 40), (40, 200, 40), (40, 40, 200))]
    good_refs = [ImageRef(save(tmp_path, f"good{i}.png", p), full(p)) for i, p in enumerate(good)]
    (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    refs = [
        good_refs[0],
        ImageRef("missing.jpg", Box(0, 0, 10, 10)),
        good_refs[1],
        ImageRef("truncated.jpg", Box(0, 0, 10, 10)),
        ImageRef(good_refs[2].url, Box(100, 100, 120, 120)),  # box wholly outside the 24x24 image
        good_refs[2],
    ]
    result = color_histogram_features(refs, tmp_path)
    assert result.failed == ["missing.jpg", "truncated.jpg", good_refs[2].url]
    assert len(result.reasons) == 3 and "file not found" in result.reasons[0]
    assert "box" in result.reasons[2]
    assert result.features.shape[0] == len(refs)
    np.testing.assert_array_equal(result.features[[1, 3, 4]], 0.0)
    alone = color_histogram_features(good_refs, tmp_path).features
    np.testing.assert_array_equal(result.features[[0, 2, 5]], alone)


def test_threads_keep_the_order_and_progress_counts_every_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    patches = [noisy_colour(rng, tuple(int(c) for c in rng.integers(0, 256, 3)), (16, 16)) for _ in range(12)]
    refs = [ImageRef(save(tmp_path, f"p{i}.png", p), full(p)) for i, p in enumerate(patches)]
    ticks: list[None] = []
    threaded = color_histogram_features(refs, tmp_path, workers=3, progress=lambda: ticks.append(None))
    assert len(ticks) == len(refs)
    serial = np.stack([histogram_feature(p) for p in patches])
    np.testing.assert_array_equal(threaded.features, serial)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"bins": 0}, "bins"), ({"color_space": "lab"}, "color_space"), ({"workers": 0}, "workers")],
)
def test_bad_options_are_refused(tmp_path: Path, options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        color_histogram_features([], tmp_path, **options)
