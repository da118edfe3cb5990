"""Contact sheets of retrieval results, like the paper's Fig. 3: each query crop beside its top-k
gallery crops, matches framed green and misses red.

A score says how often retrieval fails; a sheet shows how (colour casts, occlusion, the wrong
category, near-duplicate shop shots), which is what decides the next change. The PNG is for a
glance; the HTML page carries the same grid with the urls and scores, in one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, ImageOps

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.data.images import load_item
from jdfashion.data.jdformat import ImageRef

logger = logging.getLogger(__name__)

Colour = tuple[int, int, int]
QUERY_COLOUR: Colour = (40, 90, 210)
MATCH_COLOUR: Colour = (20, 170, 60)
MISS_COLOUR: Colour = (215, 35, 35)
UNJUDGED_COLOUR: Colour = (150, 150, 150)
BACKGROUND: Colour = (255, 255, 255)
MISSING_FILL: Colour = (205, 205, 205)
MISSING_CROSS: Colour = (120, 120, 120)


@dataclass(frozen=True)
class _Cell:
    """One tile of the grid, with what its HTML caption says."""

    image: Image.Image
    url: str
    label: str
    status: str
    score: float | None = None


def render_sheet(
    queries: Sequence[ImageRef],
    ranked: Mapping[str, Sequence[str]],
    truth: Mapping[str, Collection[str]] | None,
    gallery_refs: Mapping[str, ImageRef],
    image_root: Path,
    out_png: Path,
    out_html: Path | None = None,
    *,
    scores: Mapping[str, Sequence[float]] | None = None,
    k: int = 10,
    max_queries: int = 8,
    thumb: int = 96,
) -> Path:
    """Draw the first ``max_queries`` queries, one row each: the query, then its top ``k`` results.

    The PNG is exactly ``(k + 1) * thumb`` by ``rows * thumb`` pixels. Results are framed green (in
    ``truth``), red (not in it) or grey (no ``truth`` for the query). An image that cannot be loaded
    (missing file, bad box, url without a gallery entry) is drawn as a grey tile with an X; the count
    is logged and stated on the HTML page. ``scores`` (query url -> scores aligned with ``ranked``)
    are shown in the HTML captions. Both files are written atomically.
    """
    if k < 1 or max_queries < 1:
        raise ValueError(f"k ({k}) and max_queries ({max_queries}) must be at least 1")
    if thumb < 16:
        raise ValueError(f"thumb {thumb} is too small to draw (at least 16 pixels)")
    shown = list(queries[:max_queries])
    if not shown:
        raise ValueError("no queries to show")
    drawer = _TileDrawer(image_root, thumb)
    rows = [
        _row(
            query,
            list(ranked.get(query.url, ()))[:k],
            None if truth is None else truth.get(query.url),
            list(scores.get(query.url, ())) if scores is not None else [],
            gallery_refs,
            drawer,
        )
        for query in shown
    ]
    sheet = Image.new("RGB", ((k + 1) * thumb, len(rows) * thumb), BACKGROUND)
    for row_index, row in enumerate(rows):
        for column, cell in enumerate(row):
            sheet.paste(cell.image, (column * thumb, row_index * thumb))
    with atomic_path(out_png) as tmp:
        sheet.save(tmp, format="PNG")
    if drawer.failed:
        logger.warning("%d image(s) could not be drawn: %s", len(drawer.failed), "; ".join(drawer.failed[:5]))
    if out_html is not None:
        atomic_write_text(out_html, _page(rows, k, truth is not None, drawer.failed))
    return Path(out_png)


def _row(
    query: ImageRef,
    results: Sequence[str],
    relevant: Collection[str] | None,
    result_scores: Sequence[float],
    gallery_refs: Mapping[str, ImageRef],
    drawer: _TileDrawer,
) -> list[_Cell]:
    """The query tile, then one tile per result; ``relevant`` None means the query is not judged."""
    cells = [_Cell(drawer.tile(query, query.url, QUERY_COLOUR, "Q"), query.url, "query", "query")]
    for rank, url in enumerate(results, start=1):
        if relevant is None:
            status, colour = "unjudged", UNJUDGED_COLOUR
        elif url in relevant:
            status, colour = "match", MATCH_COLOUR
        else:
            status, colour = "miss", MISS_COLOUR
        score = result_scores[rank - 1] if rank <= len(result_scores) else None
        tile = drawer.tile(gallery_refs.get(url), url, colour, str(rank))
        cells.append(_Cell(tile, url, str(rank), status, score))
    return cells


class _TileDrawer:
    """Draws framed, labelled thumbnails and remembers which images failed to load."""

    def __init__(self, image_root: Path, thumb: int) -> None:
        self.image_root = image_root
        self.thumb = thumb
        self.border = max(2, thumb // 24)
        self.font = ImageFont.load_default(size=max(10, thumb // 7))
        self.failed: list[str] = []

    def tile(self, ref: ImageRef | None, url: str, colour: Colour, label: str) -> Image.Image:
        inner = self.thumb - 2 * self.border
        crop = self._crop(ref, url)
        content = (
            _missing_tile(inner) if crop is None else ImageOps.pad(crop, (inner, inner), color=BACKGROUND)
        )
        tile = Image.new("RGB", (self.thumb, self.thumb), colour)
        tile.paste(content, (self.border, self.border))
        draw = ImageDraw.Draw(tile)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=self.font)
        pad = max(1, self.border // 2)
        origin = (self.border, self.border)
        draw.rectangle(
            (*origin, origin[0] + right - left + 2 * pad, origin[1] + bottom - top + 2 * pad), fill=colour
        )
        draw.text((origin[0] + pad - left, origin[1] + pad - top), label, fill=BACKGROUND, font=self.font)
        return tile

    def _crop(self, ref: ImageRef | None, url: str) -> Image.Image | None:
        if ref is None:
            self.failed.append(f"{url}: no box for it in the gallery list")
            return None
        try:
            return Image.fromarray(load_item(ref, self.image_root))
        except (OSError, ValueError) as error:
            self.failed.append(str(error))
            return None


def _missing_tile(size: int) -> Image.Image:
    tile = Image.new("RGB", (size, size), MISSING_FILL)
    draw = ImageDraw.Draw(tile)
    width = max(1, size // 32)
    draw.line((0, 0, size - 1, size - 1), fill=MISSING_CROSS, width=width)
    draw.line((0, size - 1, size - 1, 0), fill=MISSING_CROSS, width=width)
    return tile


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: sans-serif; margin: 1em; }
table { border-collapse: collapse; }
td { vertical-align: top; padding: 3px; width: 9em; }
figure { margin: 0; }
figcaption { font-size: 11px; overflow-wrap: anywhere; }
figcaption b { display: block; }
""" + "".join(
    f".{status} b {{ color: rgb{colour}; }}\n"
    for status, colour in {"match": MATCH_COLOUR, "miss": MISS_COLOUR, "query": QUERY_COLOUR}.items()
)


def _page(rows: Sequence[Sequence[_Cell]], k: int, judged: bool, failed: Sequence[str]) -> str:
    legend = "green: a true match, red: not one" if judged else "no ground truth: results framed grey"
    notes = [f"{len(rows)} queries, top {k} results each; {legend}."]
    if failed:
        notes.append(f"{len(failed)} image(s) could not be loaded (grey tiles with an X).")
    body = "\n".join(f"<tr>{''.join(_cell_html(cell) for cell in row)}</tr>" for row in rows)
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>Retrieval results</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        "<h1>Retrieval results</h1>\n"
        + "".join(f"<p>{html.escape(note)}</p>\n" for note in notes)
        + f"<table>\n{body}\n</table>\n</body>\n</html>\n"
    )


def _cell_html(cell: _Cell) -> str:
    heading = cell.label if cell.score is None else f"{cell.label} · {cell.score:.4f}"
    if cell.status in {"match", "miss"}:
        heading += f" ({cell.status})"
    url = html.escape(cell.url)
    return (
        f'<td class="{cell.status}"><figure><img src="{_data_uri(cell.image)}" alt="{url}">'
        f"<figcaption><b>{html.escape(heading)}</b>{url}</figcaption></figure></td>"
    )
