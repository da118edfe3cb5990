"""Deskewing query photos: the tilt read from their own edges (jdfashion.data.deskew)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from jdfashion.data.deskew import Deskew, tilt
from jdfashion.data.loader import eval_transform


def folded(angle: float) -> float:
    """An angle modulo 90 degrees, in [-45, 45): the tilt cannot tell a quarter turn."""
    return (angle + 45) % 90 - 45


def turned(photo: Image.Image, angle: float) -> np.ndarray:
    """As the Grocery protocol turns its queries: counter-clockwise, the canvas grown, black corners."""
    return np.asarray(photo.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True))


@pytest.fixture
def package_photos(shared_data: Path) -> list[Image.Image]:
    """Four in-store photos of packages (Grocery Store Dataset, Klasson et al. 2019)."""
    photos = sorted((shared_data / "grocery-store" / "dataset" / "test" / "Packages").glob("*/*/*.jpg"))
    if not photos:
        pytest.skip("no Grocery package photos")
    return [Image.open(path).convert("RGB") for path in photos[:: len(photos) // 4][:4]]


def test_a_drawn_rectangle_reads_its_own_tilt() -> None:
    image = np.full((200, 240, 3), 255, np.uint8)
    corners = cv2.boxPoints(((120, 100), (110, 60), -20.0))  # OpenCV's angle is clockwise on screen
    cv2.fillPoly(image, [np.round(corners).astype(np.int32)], (40, 90, 160))
    assert tilt(image) == pytest.approx(20.0, abs=0.5)
    upright = np.full((200, 240, 3), 255, np.uint8)
    upright[70:130, 60:170] = (40, 90, 160)
    assert tilt(upright) == pytest.approx(0.0, abs=0.5)


@pytest.mark.parametrize("angle", [25.0, -35.0, 70.0])
def test_the_tilt_of_a_real_photo_follows_its_turn(package_photos: list[Image.Image], angle: float) -> None:
    """The estimate turns with the photo (modulo 90), the black corners of the grown canvas aside."""
    errors = [
        abs(folded(tilt(turned(photo, angle)) - tilt(np.asarray(photo)) - angle)) for photo in package_photos
    ]
    assert np.median(errors) < 2.5, errors


def test_deskew_straightens_a_turned_photo(package_photos: list[Image.Image]) -> None:
    for photo in package_photos:
        slanted = turned(photo, 30.0)
        straightened = Deskew()(image=slanted)["image"]
        assert abs(tilt(straightened)) < 2.5
        assert abs(tilt(slanted)) > abs(tilt(straightened))


def test_deskew_runs_before_the_resize_and_only_when_asked(package_photos: list[Image.Image]) -> None:
    stats = ((0.5,) * 3, (0.5,) * 3)
    image = turned(package_photos[0], 30.0)
    plain = eval_transform(64, *stats)(image=image)["image"]
    straightened = eval_transform(64, *stats, deskew=True)(image=image)["image"]
    assert straightened.shape == plain.shape == (3, 64, 64)
    assert not np.allclose(straightened.numpy(), plain.numpy())
    # A photo whose edges are already square is left as it is.
    square = np.full((64, 64, 3), 255, np.uint8)
    square[16:48, 20:44] = 0
    assert np.array_equal(Deskew()(image=square)["image"], square)


def test_deskewed_queries_through_the_cli(
    tiny_resnet18: tuple[Path, Path, list[str | Path]], cli: Callable[..., str]
) -> None:
    """--deskew-queries: the query side is cached deskewed under its own fingerprint, the gallery not."""
    _, weights, common = tiny_resnet18
    invoke = cli
    invoke("extract", "--backbone", "resnet18", "--split", "val", *common)
    invoke("extract", "--backbone", "resnet18", "--split", "val", "--deskew-queries", *common)
    indexes = [json.loads(path.read_text()) for path in (weights / "features").glob("*/index.json")]
    assert sorted(index["deskew"] for index in indexes) == [False, False, True], (
        "plain queries, gallery, deskewed queries"
    )
    (deskewed,) = [index for index in indexes if index["deskew"]]
    (plain,) = [index for index in indexes if not index["deskew"] and index["ids"] == deskewed["ids"]]
    assert plain["ids"] == deskewed["ids"]
