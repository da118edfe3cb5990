"""A small synthetic consumer-to-shop dataset in the official layout, so every command runs offline.

The real JD images cannot be fetched from here; the demo set exercises the same list files, boxes and
URL-to-path mapping. Identities come in siblings that share their colours and differ only in pattern
and logo, so a colour histogram cannot solve the task while a model that looks at detail can.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from jdfashion.atomic import atomic_write_bytes
from jdfashion.data.images import url_to_path
from jdfashion.data.jdformat import Box, Category, ImageRef, Pair, write_images, write_pairs, write_truth
from jdfashion.paths import DataLayout

DEMO_HOST = "demo.jdfashion.local"
MIN_IMAGE_SIZE = 64

# Base colours are drawn from a short palette on purpose: many identities share one.
_PALETTE = np.array(
    [
        (200, 30, 40),
        (30, 50, 110),
        (25, 25, 28),
        (128, 128, 132),
        (215, 195, 160),
        (90, 110, 50),
        (230, 140, 170),
        (110, 170, 220),
        (220, 170, 40),
        (120, 70, 40),
        (40, 130, 120),
    ],
    dtype=np.float32,
)
_TRIM_COLOURS = np.array([(20, 20, 20), (240, 240, 236), (100, 60, 35), (150, 150, 150)], dtype=np.float32)
_PATTERNS = ("stripes", "checks", "dots", "gradient")
_GLYPHS = ("circle", "ring", "triangle", "diamond", "cross")

# Outlines in unit coordinates of the square item sprite (x right, y down).
_TOP_OUTLINE = (
    (0.36, 0.06), (0.17, 0.13), (0.02, 0.36), (0.14, 0.46), (0.25, 0.37), (0.25, 0.95),
    (0.75, 0.95), (0.75, 0.37), (0.86, 0.46), (0.98, 0.36), (0.83, 0.13), (0.64, 0.06),
    (0.58, 0.13), (0.50, 0.16), (0.42, 0.13),
)  # fmt: skip
_SHOE_UPPER = (
    (0.04, 0.84), (0.04, 0.50), (0.10, 0.40), (0.30, 0.44), (0.42, 0.54), (0.60, 0.58),
    (0.80, 0.62), (0.93, 0.68), (0.97, 0.78), (0.97, 0.84),
)  # fmt: skip
# Where each category's logo may sit (centre x range, centre y range), inside the item's body.
_GLYPH_REGION = {
    Category.CLOTHES: ((0.40, 0.60), (0.28, 0.55)),
    Category.BAGS: ((0.30, 0.70), (0.58, 0.80)),
    Category.SHOES: ((0.35, 0.75), (0.64, 0.72)),
}
_POOLS = ("train", "test", "distractor")


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo set; every count is per category (clothes, bags, shoes)."""

    train_identities: int = 24
    test_identities: int = 10
    consumer_photos: int = 3
    distractors: int = 20
    image_size: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        minimums = {
            "train_identities": 1,
            "test_identities": 1,
            "consumer_photos": 1,
            "distractors": 0,
            "image_size": MIN_IMAGE_SIZE,
            "seed": 0,
        }
        for name, minimum in minimums.items():
            if getattr(self, name) < minimum:
                raise ValueError(f"DemoConfig.{name} must be >= {minimum}, got {getattr(self, name)}")


@dataclass(frozen=True)
class CategoryCounts:
    train_identities: int
    train_pairs: int
    test_identities: int
    queries: int
    distractors: int
    gallery: int


@dataclass(frozen=True)
class DemoSummary:
    """What ``make_demo`` wrote: the layout's paths (lists, truth, images) and the counts per category."""

    layout: DataLayout
    counts: Mapping[Category, CategoryCounts]
    images: int


_COLOURS, _DETAIL, _SHOP, _CONSUMER = range(4)


@dataclass(frozen=True)
class _Identity:
    category: Category
    pool: str
    index: int
    seed: int

    def rng(self, purpose: int, *key: int) -> np.random.Generator:
        """An independent stream per purpose and key, so one pool's size never changes another's items."""
        return np.random.default_rng([self.seed, int(self.category), _POOLS.index(self.pool), purpose, *key])

    @property
    def token(self) -> str:
        """An opaque id for the URL, stable for a seed, that does not reveal train/test membership."""
        text = f"{self.seed}/{self.category.label}/{self.pool}/{self.index}"
        return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()

    def url(self, role: str, number: int) -> str:
        return f"http://{DEMO_HOST}/{self.category.label}/{self.token}_{role}_{number}.jpg"


def make_demo(out_root: Path, config: DemoConfig, overwrite: bool = False) -> DemoSummary:
    """Write p.txt, q_all.txt, s.txt, gt.txt and every image under ``out_root``.

    An earlier demo set is replaced; other lists only with ``overwrite``, so real data is never clobbered.
    """
    layout = DataLayout(Path(out_root))
    query_file = layout.root / "q_all.txt"
    if not overwrite:
        for path in (layout.pairs, query_file, layout.gallery, layout.truth):
            if path.exists() and not _starts_with_demo_url(path):
                raise FileExistsError(
                    f"{path} exists and is not demo data; pass overwrite=True to replace it"
                )
    pairs: list[Pair] = []
    queries: list[ImageRef] = []
    gallery: list[ImageRef] = []
    truth: dict[str, list[str]] = {}
    counts: dict[Category, CategoryCounts] = {}
    images = 0
    for category in Category:
        sizes = (config.train_identities, config.test_identities, config.distractors)
        for pool, size in zip(_POOLS, sizes, strict=True):
            for index in range(size):
                identity = _Identity(category, pool, index, config.seed)
                sprite, alpha = _render_item(identity, config.image_size)
                image, box = _shop_photo(sprite, alpha, config.image_size, identity.rng(_SHOP, index))
                shop = ImageRef(identity.url("shop", 0), box)
                _save_jpeg(url_to_path(shop.url, layout.images), image, quality=92)
                images += 1
                if pool != "train":
                    gallery.append(shop)
                if pool == "distractor":
                    continue
                for number in range(config.consumer_photos):
                    rng = identity.rng(_CONSUMER, index, number)
                    image, box = _consumer_photo(sprite, alpha, config.image_size, rng)
                    consumer = ImageRef(identity.url("consumer", number), box)
                    path = url_to_path(consumer.url, layout.images)
                    _save_jpeg(path, image, quality=int(rng.integers(50, 91)))
                    images += 1
                    if pool == "train":
                        pairs.append(Pair(consumer, shop, category))
                    else:
                        queries.append(consumer)
                        truth[consumer.url] = [shop.url]
        counts[category] = CategoryCounts(
            train_identities=config.train_identities,
            train_pairs=config.train_identities * config.consumer_photos,
            test_identities=config.test_identities,
            queries=config.test_identities * config.consumer_photos,
            distractors=config.distractors,
            gallery=config.test_identities + config.distractors,
        )
    # Shuffled so that nothing downstream can lean on category or identity order.
    order_rng = np.random.default_rng([config.seed, len(_POOLS)])
    queries = [queries[i] for i in order_rng.permutation(len(queries))]
    gallery = [gallery[i] for i in order_rng.permutation(len(gallery))]
    write_pairs(layout.pairs, pairs)
    write_images(query_file, queries)
    write_images(layout.gallery, gallery)
    write_truth(layout.truth, {query.url: truth[query.url] for query in queries})
    return DemoSummary(layout=layout, counts=counts, images=images)


def _starts_with_demo_url(path: Path) -> bool:
    prefix = f"http://{DEMO_HOST}/".encode()
    with open(path, "rb") as handle:
        return handle.read(len(prefix)) == prefix


def _render_item(identity: _Identity, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The item alone on a size x size sprite: (uint8 RGB, float32 alpha that is 0 or 1)."""
    # Siblings (indices 2k and 2k+1) draw their colours from the same stream, so they share them exactly.
    colour_rng = identity.rng(_COLOURS, identity.index // 2)
    base_index, accent_index = colour_rng.choice(len(_PALETTE), size=2, replace=False)
    base, accent = _PALETTE[base_index], _PALETTE[accent_index]
    trim_colour = _TRIM_COLOURS[colour_rng.integers(len(_TRIM_COLOURS))]
    rng = identity.rng(_DETAIL, identity.index)

    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size
    body, trim = _silhouette(identity.category, size, ys, rng)
    angle = rng.uniform(0, np.pi)
    u = xs * np.cos(angle) + ys * np.sin(angle)
    v = ys * np.cos(angle) - xs * np.sin(angle)
    weight = _pattern_weight(_PATTERNS[rng.integers(len(_PATTERNS))], u, v, rng)[..., None]
    colour = base * (1 - weight) + accent * weight
    colour[trim] = trim_colour
    _draw_glyph(colour, identity.category, size, rng)

    mask = (body | trim).astype(np.uint8)
    colour *= (1.08 - 0.2 * ys)[..., None]  # soft top light gives the flat drawing some volume
    edge = mask.astype(bool) & ~cv2.erode(mask, np.ones((3, 3), np.uint8), iterations=2).astype(bool)
    colour[edge] *= 0.55
    return np.clip(colour, 0, 255).astype(np.uint8), mask.astype(np.float32)


def _silhouette(
    category: Category, size: int, ys: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (body, trim) masks; trim is the collar and hem, the bag's handle and flap, the shoe's sole."""
    body_image, trim_image = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
    draw_body, draw_trim = ImageDraw.Draw(body_image), ImageDraw.Draw(trim_image)

    def jittered(points: tuple[tuple[float, float], ...]) -> list[tuple[float, float]]:
        moved = np.clip(np.array(points) + rng.normal(0, 0.01, size=(len(points), 2)), 0.01, 0.99) * size
        return [(float(x), float(y)) for x, y in moved]

    def scaled(x1: float, y1: float, x2: float, y2: float) -> tuple[float, float, float, float]:
        return (x1 * size, y1 * size, x2 * size, y2 * size)

    if category is Category.CLOTHES:
        outline = jittered(_TOP_OUTLINE)
        draw_body.polygon(outline, fill=255)
        draw_trim.line([*outline[11:], outline[0]], fill=255, width=max(2, size // 32))
        body = np.asarray(body_image) > 0
        return body, (np.asarray(trim_image) > 0) | (body & (ys >= rng.uniform(0.87, 0.92)))
    if category is Category.BAGS:
        top = rng.uniform(0.32, 0.40)
        draw_body.rounded_rectangle(scaled(0.08, top, 0.92, 0.95), radius=0.1 * size, fill=255)
        half_width = rng.uniform(0.18, 0.28)
        handle = scaled(0.5 - half_width, 0.04, 0.5 + half_width, 2 * top - 0.04)
        draw_trim.arc(handle, start=180, end=360, fill=255, width=max(2, int(0.06 * size)))
        body = np.asarray(body_image) > 0
        flap = body & (ys < top + rng.uniform(0.06, 0.14))
        return body, (np.asarray(trim_image) > 0) | flap
    draw_body.polygon(jittered(_SHOE_UPPER), fill=255)
    sole = scaled(0.02, 0.80, 0.98, rng.uniform(0.88, 0.93))
    draw_trim.rounded_rectangle(sole, radius=0.04 * size, fill=255)
    return np.asarray(body_image) > 0, np.asarray(trim_image) > 0


def _pattern_weight(kind: str, u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Where the accent colour shows, in [0, 1], for a pattern of random frequency, phase and duty."""
    frequency = rng.uniform(3, 10)
    phase = rng.uniform(0, 2 * np.pi)
    wave_u = np.sin(2 * np.pi * frequency * u + phase)
    if kind == "stripes":
        return (wave_u > rng.uniform(-0.5, 0.5)).astype(np.float32)
    if kind == "checks":
        return ((wave_u > 0) ^ (np.sin(2 * np.pi * frequency * v) > 0)).astype(np.float32)
    if kind == "dots":
        du, dv = (frequency * u) % 1 - 0.5, (frequency * v) % 1 - 0.5
        return (du**2 + dv**2 < rng.uniform(0.18, 0.32) ** 2).astype(np.float32)
    return (0.5 + 0.5 * np.sin(2 * np.pi * frequency / 4 * u + phase)).astype(np.float32)


def _draw_glyph(colour: np.ndarray, category: Category, size: int, rng: np.random.Generator) -> None:
    """A small logo in a random palette colour: the finest detail that tells siblings apart."""
    (x_low, x_high), (y_low, y_high) = _GLYPH_REGION[category]
    cx, cy = rng.uniform(x_low, x_high) * size, rng.uniform(y_low, y_high) * size
    radius = rng.uniform(0.045, 0.08) * size
    ink = tuple(float(c) for c in _PALETTE[rng.integers(len(_PALETTE))])
    thickness = max(1, round(radius / 3))
    kind = _GLYPHS[rng.integers(len(_GLYPHS))]
    centre = (round(cx), round(cy))
    if kind in ("circle", "ring"):
        cv2.circle(colour, centre, round(radius), ink, -1 if kind == "circle" else thickness, cv2.LINE_AA)
        return
    if kind == "cross":
        r = round(radius)
        cv2.line(colour, (centre[0] - r, centre[1]), (centre[0] + r, centre[1]), ink, thickness, cv2.LINE_AA)
        cv2.line(colour, (centre[0], centre[1] - r), (centre[0], centre[1] + r), ink, thickness, cv2.LINE_AA)
        return
    corners = 3 if kind == "triangle" else 4
    turns = np.arange(corners) * 2 * np.pi / corners - np.pi / 2
    points = np.stack([cx + radius * np.cos(turns), cy + radius * np.sin(turns)], axis=1)
    cv2.fillPoly(colour, [np.round(points).astype(np.int32)], ink, cv2.LINE_AA)


def _item_corners(alpha: np.ndarray) -> np.ndarray:
    """The four corners of the item's tight box in the sprite, clockwise from top-left, as float32."""
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    x1, x2, y1, y2 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], dtype=np.float32)


def _place(
    sprite: np.ndarray, alpha: np.ndarray, homography: np.ndarray, background: np.ndarray
) -> tuple[np.ndarray, Box]:
    """Warp the item onto ``background``; the box is the warped item's true tight box."""
    height, width = background.shape[:2]
    warped = cv2.warpPerspective(sprite, homography, (width, height), flags=cv2.INTER_LINEAR)
    coverage = cv2.warpPerspective(alpha, homography, (width, height), flags=cv2.INTER_LINEAR)[..., None]
    image = coverage * warped + (1 - coverage) * background
    rows = np.flatnonzero((coverage[..., 0] > 0.5).any(axis=1))
    cols = np.flatnonzero((coverage[..., 0] > 0.5).any(axis=0))
    return image.astype(np.float32), Box(int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def _shop_photo(
    sprite: np.ndarray, alpha: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, Box]:
    """The clean catalogue shot: the item upright, centred, on white."""
    corners = _item_corners(alpha)
    extent = corners[2] - corners[0]
    scale = rng.uniform(0.7, 0.86) * size / extent.max()
    shift = size / 2 + rng.uniform(-0.03, 0.03, size=2) * size - scale * (corners[0] + extent / 2)
    homography = np.array([[scale, 0, shift[0]], [0, scale, shift[1]], [0, 0, 1]])
    image, box = _place(sprite, alpha, homography, np.full((size, size, 3), 255, np.float32))
    return np.clip(image, 0, 255).astype(np.uint8), box


def _consumer_photo(
    sprite: np.ndarray, alpha: np.ndarray, size: int, rng: np.random.Generator
) -> tuple[np.ndarray, Box]:
    """A phone photo of the item: mirrored or not, rotated, tilted, on clutter, lit badly, partly hidden."""
    width, height = size, size * 4 // 3
    corners = _item_corners(alpha)
    centre = corners.mean(axis=0)
    long_side = rng.uniform(0.5, 0.75) * width
    scale = long_side / (corners[2] - corners[0]).max()
    mirror = -1.0 if rng.random() < 0.5 else 1.0
    angle = np.deg2rad(rng.uniform(-25, 25))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    target = (corners - centre) * [mirror * scale, scale] @ rotation.T
    target += np.clip(rng.normal(0, 0.05 * long_side, size=(4, 2)), -0.12 * long_side, 0.12 * long_side)
    margin = 2.0
    span = target.max(axis=0) - target.min(axis=0)
    target *= min(1.0, *((np.array([width, height]) - 2 * margin) / span))
    low, high = margin - target.min(axis=0), np.array([width, height]) - margin - target.max(axis=0)
    target += low + rng.random(2) * np.maximum(high - low, 0)  # anywhere, all inside the margin
    homography = cv2.getPerspectiveTransform(corners, target.astype(np.float32))
    image, box = _place(sprite, alpha, homography, _clutter(height, width, rng))

    if rng.random() < 0.6:  # something in front of the item: a hand, a strap, another object
        box_w, box_h = box.x2 - box.x1, box.y2 - box.y1
        centre_xy = (round(rng.uniform(box.x1, box.x2)), round(rng.uniform(box.y1, box.y2)))
        axes = tuple(max(2, round(rng.uniform(0.12, 0.22) * min(box_w, box_h))) for _ in range(2))
        ink = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        cv2.ellipse(image, centre_xy, axes, rng.uniform(0, 180), 0, 360, ink, -1, cv2.LINE_AA)
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=rng.uniform(0.3, 1.1))
    gain = rng.uniform(0.7, 1.15) * rng.uniform(0.88, 1.12, size=3)  # exposure and colour cast
    image = 255 * np.clip(image / 255 * gain, 0, 1) ** rng.uniform(0.75, 1.35)
    image += rng.normal(0, rng.uniform(1.5, 6), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), box


def _clutter(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A slightly out-of-focus scene: a colour gradient with random rectangles, discs and lines."""
    top, bottom = rng.uniform(40, 230, size=(2, 3))
    t = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    scene = np.ascontiguousarray(np.broadcast_to(top * (1 - t) + bottom * t, (height, width, 3)), np.float32)
    for _ in range(rng.integers(6, 14)):
        ink = tuple(float(c) for c in rng.uniform(0, 255, size=3))
        p1 = (int(rng.integers(width)), int(rng.integers(height)))
        p2 = (int(rng.integers(width)), int(rng.integers(height)))
        shape = rng.integers(3)
        if shape == 0:
            cv2.rectangle(scene, p1, p2, ink, -1)
        elif shape == 1:
            cv2.circle(scene, p1, int(rng.integers(3, max(4, width // 5))), ink, -1, cv2.LINE_AA)
        else:
            cv2.line(scene, p1, p2, ink, int(rng.integers(1, 5)), cv2.LINE_AA)
    return cv2.GaussianBlur(scene, (0, 0), sigmaX=rng.uniform(0.5, 2.0))


def _save_jpeg(path: Path, image: np.ndarray, quality: int) -> None:
    ok, encoded = cv2.imencode(
        ".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    atomic_write_bytes(path, encoded.tobytes())
