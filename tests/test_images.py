"""The image store: URL mapping, decoding of every pixel mode, EXIF orientation, crops and their errors."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdfashion.data.images import (
    BoxError,
    ImageDecodeError,
    crop_to_box,
    load_image,
    load_item,
    url_to_path,
)
from jdfashion.data.jdformat import Box, ImageRef

ROOT = Path("/data/images")


# --- url_to_path ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://img14.360buyimg.com/img/jfs/t1/x.jpg", ROOT / "img14.360buyimg.com/img/jfs/t1/x.jpg"),
        ("https://Example.COM:8080/a/b.png", ROOT / "example.com_8080/a/b.png"),
        ("http://host/a/b.jpg#frag", ROOT / "host/a/b.jpg"),
        ("http://host/a/%2E%2E/b.jpg", ROOT / "host/a/%2E%2E/b.jpg"),
        ("file:///abs/dir/x.jpg", Path("/abs/dir/x.jpg")),
        ("file://localhost/abs/my%20photo.jpg", Path("/abs/my photo.jpg")),
        ("shop/0001.jpg", ROOT / "shop/0001.jpg"),
        ("  shop/0001.jpg\r", ROOT / "shop/0001.jpg"),
    ],
)
def test_url_to_path_maps_each_kind_of_url(url: str, expected: Path) -> None:
    assert url_to_path(url, ROOT) == expected


def test_query_strings_map_to_distinct_files_beside_the_plain_one() -> None:
    plain = url_to_path("http://host/a/b.jpg", ROOT)
    small = url_to_path("http://host/a/b.jpg?w=100", ROOT)
    large = url_to_path("http://host/a/b.jpg?w=800", ROOT)
    assert len({plain, small, large}) == 3
    for variant in (small, large):
        assert variant.parent == plain.parent
        assert variant.suffix == ".jpg"
        assert variant.stem.startswith("b_")
    assert url_to_path("http://host/a/b.jpg?w=100", ROOT) == small


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://host/a/../../etc/passwd", "'..'"),
        ("file:///data/../etc/x.jpg", "'..'"),
        ("file:///data/%2E%2E/etc/x.jpg", "'..'"),
        ("shop/../../x.jpg", "'..'"),
        ("", "no file name"),
        ("http://host/", "no file name"),
        ("http://host/dir/", "no file name"),
        ("http:///a.jpg", "no host"),
        ("http://host:99999/a.jpg", "bad port"),
        ("ftp://host/a.jpg", "unsupported scheme"),
        ("file://elsewhere/a.jpg", "another host"),
        ("/abs/x.jpg", "file://"),
    ],
)
def test_url_to_path_rejects_unsafe_or_empty_urls(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)) as info:
        url_to_path(url, ROOT)
    assert repr(url) in str(info.value)


# --- load_image: modes ---------------------------------------------------------------------------


def _save(image: Image.Image, path: Path, **options: object) -> Path:
    image.save(path, **options)
    return path


def _stored_mode(path: Path) -> str:
    with Image.open(path) as image:
        return image.mode


def test_grey_image_becomes_rgb_with_equal_channels(tmp_path: Path) -> None:
    grey = np.array([[0, 77], [200, 255]], dtype=np.uint8)
    path = _save(Image.fromarray(grey), tmp_path / "grey.png")
    loaded = load_image(path)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.repeat(grey[:, :, None], 3, axis=2))


def test_bilevel_image_becomes_black_and_white(tmp_path: Path) -> None:
    bits = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).convert("1")
    loaded = np.asarray(load_image(_save(bits, tmp_path / "bits.png")))
    assert loaded[0, 0].tolist() == [0, 0, 0]
    assert loaded[0, 1].tolist() == [255, 255, 255]


def test_cmyk_jpeg_becomes_the_matching_rgb_colour(tmp_path: Path) -> None:
    cyan_free_red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    path = _save(cyan_free_red, tmp_path / "cmyk.jpg", quality=95)
    assert _stored_mode(path) == "CMYK"
    loaded = np.asarray(load_image(path)).astype(int)
    assert np.abs(loaded - np.array([255, 0, 0])).max() <= 8


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.array(
        [[[255, 0, 0, 0], [0, 0, 255, 255]], [[0, 0, 0, 128], [0, 200, 0, 255]]], dtype=np.uint8
    )
    loaded = np.asarray(load_image(_save(Image.fromarray(pixels), tmp_path / "rgba.png"))).astype(int)
    assert loaded[0, 0].tolist() == [255, 255, 255]
    assert loaded[0, 1].tolist() == [0, 0, 255]
    assert loaded[1, 1].tolist() == [0, 200, 0]
    half_black_on_white = 255 - 128 * 255 / 255
    assert np.abs(loaded[1, 0] - half_black_on_white).max() <= 1


def test_grey_with_alpha_is_composited_on_white(tmp_path: Path) -> None:
    pixels = np.array([[[30, 0], [30, 255]]], dtype=np.uint8)
    loaded = np.asarray(load_image(_save(Image.fromarray(pixels, mode="LA"), tmp_path / "la.png")))
    assert loaded[0].tolist() == [[255, 255, 255], [30, 30, 30]]


def test_palette_transparency_becomes_white(tmp_path: Path) -> None:
    palette_image = Image.new("P", (2, 1))
    palette_image.putpalette([10, 20, 30, 0, 180, 0] + [0] * (256 * 3 - 6))
    palette_image.putdata([0, 1])
    path = _save(palette_image, tmp_path / "p.png", transparency=0)
    assert _stored_mode(path) == "P"
    assert np.asarray(load_image(path))[0].tolist() == [[255, 255, 255], [0, 180, 0]]


def test_palette_without_transparency_keeps_its_colours(tmp_path: Path) -> None:
    palette_image = Image.new("P", (1, 1))
    palette_image.putpalette([10, 20, 30] + [0] * (255 * 3))
    assert np.asarray(load_image(_save(palette_image, tmp_path / "p.gif")))[0, 0].tolist() == [10, 20, 30]


def test_sixteen_bit_png_keeps_its_full_range(tmp_path: Path) -> None:
    samples = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(samples), tmp_path / "deep.png")
    assert _stored_mode(path).startswith("I;16")
    loaded = np.asarray(load_image(path))
    assert loaded[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (loaded[..., 0] == loaded[..., 2]).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    # Stored 64 wide x 32 high, red block in the stored top-left; orientation 6 means "rotate 90° clockwise
    # to display", which moves the stored top-left to the displayed top-right.
    stored = np.zeros((32, 64, 3), dtype=np.uint8)
    stored[..., 2] = 255
    stored[:16, :16] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(Image.fromarray(stored), tmp_path / "rotated.jpg", exif=exif, quality=95)
    loaded = load_image(path)
    assert loaded.size == (32, 64)
    shown = np.asarray(loaded).astype(int)
    assert shown[8, 32 - 8].tolist() == pytest.approx([255, 0, 0], abs=12)
    assert shown[8, 8].tolist() == pytest.approx([0, 0, 255], abs=12)
    assert shown[64 - 8, 32 - 8].tolist() == pytest.approx([0, 0, 255], abs=12)


# --- load_image: unreadable files ----------------------------------------------------------------


def _noise_jpeg(size: tuple[int, int] = (64, 48)) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_jpeg_is_detected(tmp_path: Path, fraction: float) -> None:
    data = _noise_jpeg()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageDecodeError, match=re.escape("cut.jpg")) as info:
        load_image(path)
    assert info.value.path == str(path)


def test_truncated_png_is_detected(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageDecodeError, match=re.escape("cut.png")):
        load_image(path)


def test_complete_jpeg_loads(tmp_path: Path) -> None:
    path = tmp_path / "whole.jpg"
    path.write_bytes(_noise_jpeg())
    assert load_image(path).size == (64, 48)


def test_not_an_image_is_a_decode_error(tmp_path: Path) -> None:
    path = tmp_path / "page.jpg"
    path.write_text("<html>404 Not Found</html>")
    with pytest.raises(ImageDecodeError, match=r"page\.jpg.*not an image"):
        load_image(path)


def test_missing_file_is_a_decode_error(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="not found") as info:
        load_image(tmp_path / "absent.jpg")
    assert "absent.jpg" in str(info.value)
    assert isinstance(info.value, OSError)


# --- crops ---------------------------------------------------------------------------------------


def _pattern(width: int = 20, height: int = 12) -> np.ndarray:
    rng = np.random.default_rng(2)
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_crop_inside_keeps_exact_pixels() -> None:
    pixels = _pattern()
    crop = crop_to_box(Image.fromarray(pixels), Box(3, 2, 10, 9))
    np.testing.assert_array_equal(np.asarray(crop), pixels[2:9, 3:10])


def test_crop_is_clamped_to_the_image() -> None:
    pixels = _pattern()
    crop = crop_to_box(Image.fromarray(pixels), Box(-4, 5, 35, 40))
    np.testing.assert_array_equal(np.asarray(crop), pixels[5:12, 0:20])


@pytest.mark.parametrize("box", [Box(25, 0, 40, 10), Box(0, 12, 5, 20), Box(20, 0, 30, 5), Box(-9, -9, 0, 0)])
def test_box_without_pixels_in_the_image_is_an_error(box: Box) -> None:
    with pytest.raises(BoxError, match="20x12") as info:
        crop_to_box(Image.fromarray(_pattern()), box)
    assert f"({box.x1}, {box.y1}, {box.x2}, {box.y2})" in str(info.value)


# --- load_item -----------------------------------------------------------------------------------


def test_load_item_reads_the_box_crop_of_the_mapped_file(tmp_path: Path) -> None:
    pixels = _pattern()
    ref = ImageRef("http://img.example/a/b.png", Box(2, 1, 18, 11))
    target = url_to_path(ref.url, tmp_path)
    target.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(target)
    item = load_item(ref, tmp_path)
    assert item.dtype == np.uint8
    assert item.shape == (10, 16, 3)
    assert item.flags.writeable
    np.testing.assert_array_equal(item, pixels[1:11, 2:18])


def test_load_item_errors_name_the_url(tmp_path: Path) -> None:
    missing = ImageRef("http://img.example/missing.jpg", Box(0, 0, 5, 5))
    with pytest.raises(ImageDecodeError, match=re.escape("http://img.example/missing.jpg")):
        load_item(missing, tmp_path)

    outside = ImageRef("small.png", Box(50, 50, 60, 60))
    Image.fromarray(_pattern()).save(tmp_path / "small.png")
    with pytest.raises(BoxError, match=r"small\.png.*20x12"):
        load_item(outside, tmp_path)
