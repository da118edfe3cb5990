"""Contact sheets: real images on disk, cropped by their boxes, framed by match/miss, as PNG and HTML."""

from __future__ import annotations

import base64
import io
import logging
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdfashion.data.images import url_to_path
from jdfashion.data.jdformat import Box, ImageRef
from jdfashion.report import render_sheet

THUMB = 48
K = 3
BOX = Box(10, 5, 30, 25)
SURROUND = (0, 0, 0)
ITEM_COLOURS = {
    "q0": (250, 220, 0),
    "q1": (0, 200, 200),
    "g0": (200, 0, 200),
    "g1": (90, 60, 20),
    "g2": (255, 140, 0),
    "g3": (0, 90, 255),
}


def url(name: str) -> str:
    return f"http://img.test/items/{name}.png"


@pytest.fixture
def image_root(tmp_path: Path) -> Path:
    """One 40x30 PNG per item: black, with the item's colour filling exactly its box."""
    root = tmp_path / "images"
    for name, colour in ITEM_COLOURS.items():
        pixels = np.zeros((30, 40, 3), dtype=np.uint8)
        pixels[BOX.y1 : BOX.y2, BOX.x1 : BOX.x2] = colour
        path = url_to_path(url(name), root)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path)
    return root


QUERIES = [ImageRef(url("q0"), BOX), ImageRef(url("q1"), BOX)]
GALLERY = {url(name): ImageRef(url(name), BOX) for name in ("g0", "g1", "g2", "g3", "gone")}
RANKED = {url("q0"): [url("g0"), url("g1"), url("g2")], url("q1"): [url("g3"), url("gone"), url("unlisted")]}
TRUTH = {url("q0"): {url("g1")}, url("q1"): {url("g3"), url("g2")}}


def tile_pixel(sheet: Image.Image, row: int, column: int, x: float, y: float) -> tuple[int, int, int]:
    """A pixel at fractions (x, y) of one tile."""
    return sheet.getpixel((column * THUMB + int(x * (THUMB - 1)), row * THUMB + int(y * (THUMB - 1))))


def is_green(rgb: tuple[int, int, int]) -> bool:
    return rgb[1] > 120 and rgb[0] < 80 and rgb[2] < 100


def is_red(rgb: tuple[int, int, int]) -> bool:
    return rgb[0] > 150 and rgb[1] < 80 and rgb[2] < 80


def is_grey(rgb: tuple[int, int, int]) -> bool:
    return max(rgb) - min(rgb) < 10 and 80 < rgb[0] < 240


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.cell_classes: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images.append(attributes["src"] or "")
        if tag == "td":
            self.cell_classes.append(attributes.get("class") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse_page(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def test_sheet_frames_matches_green_and_misses_red(
    image_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out_png, out_html = tmp_path / "sheet.png", tmp_path / "sheet.html"
    with caplog.at_level(logging.WARNING, logger="jdfashion.report"):
        written = render_sheet(
            QUERIES,
            RANKED,
            TRUTH,
            GALLERY,
            image_root,
            out_png,
            out_html,
            scores={url("q0"): [0.91, 0.5, 0.25]},
            k=K,
            thumb=THUMB,
        )
    assert written == out_png
    sheet = Image.open(out_png).convert("RGB")
    assert sheet.size == ((K + 1) * THUMB, len(QUERIES) * THUMB)

    left_border, middle = 0.0, 0.5
    assert is_red(tile_pixel(sheet, 0, 1, left_border, middle)), "q0 rank 1 (g0) is a miss"
    assert is_green(tile_pixel(sheet, 0, 2, left_border, middle)), "q0 rank 2 (g1) is a match"
    assert is_red(tile_pixel(sheet, 0, 3, left_border, middle))
    assert is_green(tile_pixel(sheet, 1, 1, left_border, middle)), "q1 rank 1 (g3) is a match"
    query_frame = tile_pixel(sheet, 0, 0, left_border, middle)
    assert not (is_green(query_frame) or is_red(query_frame))

    inside = 0.7
    assert tile_pixel(sheet, 0, 0, inside, inside) == ITEM_COLOURS["q0"], "the query shows its box crop"
    assert tile_pixel(sheet, 0, 3, inside, inside) == ITEM_COLOURS["g2"]
    assert tile_pixel(sheet, 1, 1, inside, inside) == ITEM_COLOURS["g3"]
    for column in (2, 3):
        assert is_grey(tile_pixel(sheet, 1, column, 0.75, 0.45)), (
            "unloadable images drawn as grey placeholders"
        )
    assert "2 image(s) could not be drawn" in caplog.text

    page = parse_page(out_html)
    assert len(page.images) == len(QUERIES) * (K + 1)
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    thumbnail = Image.open(io.BytesIO(base64.b64decode(page.images[2].split(",", 1)[1])))
    assert thumbnail.size == (THUMB, THUMB)
    assert page.cell_classes == ["query", "miss", "match", "miss", "query", "match", "miss", "miss"]
    text = " ".join(page.text)
    assert url("g2") in text and "0.91" in text and "0.25" in text
    assert "2 image(s) could not be loaded" in text


def test_without_truth_every_result_is_framed_grey(image_root: Path, tmp_path: Path) -> None:
    out_png, out_html = tmp_path / "sheet.png", tmp_path / "sheet.html"
    render_sheet(QUERIES[:1], RANKED, None, GALLERY, image_root, out_png, out_html, k=K, thumb=THUMB)
    sheet = Image.open(out_png).convert("RGB")
    assert sheet.size == ((K + 1) * THUMB, THUMB)
    for column in range(1, K + 1):
        assert is_grey(tile_pixel(sheet, 0, column, 0.0, 0.5))
    assert parse_page(out_html).cell_classes == ["query", "unjudged", "unjudged", "unjudged"]


def test_short_result_lists_leave_blank_tiles_and_rows_stop_at_max_queries(
    image_root: Path, tmp_path: Path
) -> None:
    out_png, out_html = tmp_path / "sheet.png", tmp_path / "sheet.html"
    ranked = {url("q0"): [url("g1")], url("q1"): []}
    queries = [*QUERIES, ImageRef(url("g3"), BOX)]
    render_sheet(
        queries, ranked, TRUTH, GALLERY, image_root, out_png, out_html, k=K, max_queries=2, thumb=THUMB
    )
    sheet = Image.open(out_png).convert("RGB")
    assert sheet.size == ((K + 1) * THUMB, 2 * THUMB)
    assert is_green(tile_pixel(sheet, 0, 1, 0.0, 0.5))
    assert tile_pixel(sheet, 0, 2, 0.0, 0.5) == tile_pixel(sheet, 1, 3, 0.5, 0.5) == (255, 255, 255)
    assert len(parse_page(out_html).images) == 1 + 1 + 1


def test_png_is_written_without_html_and_bad_sizes_are_refused(image_root: Path, tmp_path: Path) -> None:
    out_png = tmp_path / "only.png"
    render_sheet(QUERIES, RANKED, TRUTH, GALLERY, image_root, out_png, k=1, thumb=32)
    assert Image.open(out_png).size == (2 * 32, 2 * 32)
    assert [path.name for path in tmp_path.iterdir() if path.name != "images"] == ["only.png"]
    with pytest.raises(ValueError, match="too small"):
        render_sheet(QUERIES, RANKED, TRUTH, GALLERY, image_root, out_png, thumb=8)
    with pytest.raises(ValueError, match="no queries"):
        render_sheet([], RANKED, TRUTH, GALLERY, image_root, out_png)
