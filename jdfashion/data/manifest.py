"""Turn any labelled image collection into an official-layout data root, read in place.

A CSV manifest has the header ``path,identity,domain,category`` plus optional ``x1,y1,x2,y2`` and
``role`` columns (any order):

- ``path``: the image file, absolute or relative to the CSV's folder. Images are never copied: the
  lists name them by ``file://`` URL (``Path.as_uri``), which ``data.images.url_to_path`` reads back.
- ``identity``: any label; rows with the same identity show the same item.
- ``domain``: ``consumer`` (a photo like a query) or ``shop`` (an image like the gallery's).
- ``category``: ``0/1/2`` or ``clothes/bags/shoes``.
- ``x1..y2``: the item box in the displayed (EXIF-upright) frame; all four empty means the whole image.
- ``role``: ``train`` (the default), ``test`` or ``distractor``.

Roles: train rows make ``p.txt`` (each consumer photo paired with its identity's first shop image,
and its first photo with each further shop image);
test rows make ``q_all.txt`` (consumer photos), ``s.txt`` (shop images) and ``gt.txt`` (each query ->
its identity's test shop images); distractor rows add shop images that match no query to ``s.txt``.
Roles are per row so that one image can be both trained on and a gallery distractor: give the same
path a train row and a distractor row. An identity is never both train and test (that would leak).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import ExifTags, Image
from rich.table import Table

from jdfashion.atomic import atomic_write_text
from jdfashion.data.jdformat import (
    Box,
    Category,
    FormatError,
    ImageRef,
    Pair,
    parse_box,
    read_text,
    write_images,
    write_pairs,
    write_truth,
)
from jdfashion.paths import DataLayout

MANIFEST_COLUMNS = ("path", "identity", "domain", "category")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")
ROLES = ("train", "test", "distractor")
DOMAINS = ("consumer", "shop")
# EXIF orientations that rotate by 90 degrees: the displayed image is the stored one transposed.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})
_UNREADABLE_IMAGE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# The Grocery Store protocol (dataset/classes.csv): fine classes 28-58 are packaged products.
# Train on the 50 fruit and vegetable classes and packages 28-42; query with every in-store photo
# of the unseen packages 43-58. All 81 iconic images form the gallery, so 65 are distractors. All
# classes share category 0: the challenge's clothes/bags/shoes do not apply, and one category
# keeps every iconic image competing and trains one model on all 65 identities.
GROCERY_TEST_CLASSES = tuple(range(43, 59))
GROCERY_TRAIN_CLASSES = tuple(c for c in range(81) if c not in GROCERY_TEST_CLASSES)
GROCERY_CATEGORY = Category.CLOTHES


@dataclass(frozen=True)
class ManifestSummary:
    out_root: Path
    train_identities: int
    train_pairs: int
    test_identities: int
    queries: int
    gallery: int
    distractors: int

    def as_table(self) -> Table:
        table = Table(title=f"imported into {self.out_root}")
        table.add_column("list")
        table.add_column("count", justify="right")
        table.add_row("train identities", str(self.train_identities))
        table.add_row("p.txt pairs", str(self.train_pairs))
        table.add_row("test identities", str(self.test_identities))
        table.add_row("q_all.txt queries", str(self.queries))
        table.add_row("s.txt gallery", str(self.gallery))
        table.add_row("  of which distractors", str(self.distractors))
        return table


@dataclass(frozen=True)
class _Row:
    line: int
    ref: ImageRef
    identity: str
    domain: str
    category: Category
    role: str


def import_manifest(csv_path: str | Path, out_root: str | Path) -> ManifestSummary:
    """Validate the whole manifest, then write p.txt, q_all.txt, s.txt and gt.txt into ``out_root``."""
    rows = _read_manifest(Path(csv_path))
    _check_consistency(rows, csv_path)
    train = _group(row for row in rows if row.role == "train")
    test = _group(row for row in rows if row.role == "test")

    pairs = []
    for members in train.values():
        consumers, shops = _split_domains(members)
        if not consumers or not shops:
            missing = "consumer photo" if not consumers else "shop image to pair its photos with"
            raise FormatError(
                csv_path,
                members[0].line,
                "domain",
                f"train identity {members[0].identity!r} has no {missing}",
            )
        # Every photo with the first shop image, and the first photo with every other shop image:
        # each image appears once at least and the identity stays one connected component.
        pairs += [Pair(photo.ref, shops[0].ref, photo.category) for photo in consumers]
        pairs += [Pair(consumers[0].ref, shop.ref, shop.category) for shop in shops[1:]]

    queries, truth = [], {}
    for members in test.values():
        consumers, shops = _split_domains(members)
        if consumers and not shops:
            raise FormatError(
                csv_path,
                members[0].line,
                "domain",
                f"test identity {members[0].identity!r} has no shop image: its queries could never match",
            )
        queries += [photo.ref for photo in consumers]
        truth |= {photo.ref.url: [shop.ref.url for shop in shops] for photo in consumers}
    gallery = [
        row for row in rows if row.role == "distractor" or (row.role == "test" and row.domain == "shop")
    ]

    layout = DataLayout(Path(out_root))
    write_pairs(layout.pairs, pairs)
    write_images(layout.queries, queries)
    write_images(layout.gallery, [row.ref for row in gallery])
    write_truth(layout.truth, truth)
    return ManifestSummary(
        out_root=layout.root,
        train_identities=len(train),
        train_pairs=len(pairs),
        test_identities=len(test),
        queries=len(queries),
        gallery=len(gallery),
        distractors=sum(row.role == "distractor" for row in gallery),
    )


def grocery_manifest(
    dataset_root: str | Path,
    out_csv: str | Path,
    *,
    train_ids: Collection[int] = GROCERY_TRAIN_CLASSES,
    test_ids: Collection[int] = GROCERY_TEST_CLASSES,
) -> int:
    """Write a manifest for the Grocery Store dataset (its ``dataset/`` folder); returns the row count.

    In-store photos (all of train.txt, val.txt and test.txt) are the consumer domain, each class's
    iconic image the shop domain. Every iconic image is in the gallery: as the match of a test class,
    otherwise as a distractor (a train class's iconic image is also its training shop image).
    """
    root = Path(dataset_root).absolute()
    iconic = grocery_iconic_images(root)
    overlap = set(train_ids) & set(test_ids)
    unknown = (set(train_ids) | set(test_ids)) - iconic.keys()
    if overlap:
        raise ValueError(f"class ids in both train and test: {sorted(overlap)}")
    if unknown:
        raise ValueError(f"class ids not in {root / 'classes.csv'}: {sorted(unknown)}")
    photos: dict[int, list[Path]] = {class_id: [] for class_id in iconic}
    for list_name in ("train.txt", "val.txt", "test.txt"):
        for class_id, photo in _grocery_photos(root / list_name, iconic.keys()):
            photos[class_id].append(photo)

    rows = []
    for class_id, (name, iconic_path) in iconic.items():
        role = "train" if class_id in train_ids else "test" if class_id in test_ids else None
        if role is not None:
            rows.append((iconic_path, name, "shop", role))
            rows += [(photo, name, "consumer", role) for photo in photos[class_id]]
        if role != "test":
            rows.append((iconic_path, name, "shop", "distractor"))
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*MANIFEST_COLUMNS, "role"])
    writer.writerows((path, name, domain, GROCERY_CATEGORY.value, role) for path, name, domain, role in rows)
    atomic_write_text(out_csv, buffer.getvalue())
    return len(rows)


def _read_manifest(csv_path: Path) -> list[_Row]:
    reader = csv.reader(io.StringIO(read_text(csv_path), newline=""))
    header = next(reader, None)
    if header is None:
        raise FormatError(csv_path, 1, "header", f"empty file; expected {','.join(MANIFEST_COLUMNS)}")
    columns = [name.strip().lower() for name in header]
    _check_header(columns, csv_path, reader.line_num)
    folder = csv_path.absolute().parent
    rows = []
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue
        line = reader.line_num
        if len(record) != len(columns):
            expected = f"expected {len(columns)} fields ({','.join(columns)}), got {len(record)}"
            raise FormatError(csv_path, line, "field count", expected)
        rows.append(
            _parse_row(
                dict(zip(columns, (cell.strip() for cell in record), strict=True)), folder, csv_path, line
            )
        )
    if not rows:
        raise FormatError(csv_path, reader.line_num + 1, "rows", "no images listed; add a row per image")
    return rows


def _check_header(columns: Sequence[str], csv_path: Path, line: int) -> None:
    known = (*MANIFEST_COLUMNS, *BOX_COLUMNS, "role")
    missing = [name for name in MANIFEST_COLUMNS if name not in columns]
    unknown = [name for name in columns if name not in known]
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    box_columns = [name for name in BOX_COLUMNS if name in columns]
    problems = [
        f"missing {', '.join(missing)}" if missing else "",
        f"unknown {', '.join(unknown)}" if unknown else "",
        f"repeated {', '.join(duplicated)}" if duplicated else "",
        "give all of x1,y1,x2,y2 or none" if box_columns and len(box_columns) != len(BOX_COLUMNS) else "",
    ]
    if any(problems):
        expected = f"expected {','.join(MANIFEST_COLUMNS)}[,{','.join(BOX_COLUMNS)}][,role]"
        raise FormatError(csv_path, line, "header", f"{'; '.join(p for p in problems if p)} ({expected})")


def _parse_row(cells: dict[str, str], folder: Path, csv_path: Path, line: int) -> _Row:
    for name in ("path", "identity"):
        if not cells[name]:
            raise FormatError(csv_path, line, name, "empty")
    image = Path(os.path.normpath(folder / cells["path"]))
    if not image.is_file():
        raise FormatError(csv_path, line, "path", f"no such file: {image}")
    domain = cells["domain"].lower()
    if domain not in DOMAINS:
        raise FormatError(csv_path, line, "domain", f"{cells['domain']!r} is not one of {', '.join(DOMAINS)}")
    try:
        category = Category.parse(cells["category"])
    except ValueError as error:
        raise FormatError(csv_path, line, "category", str(error)) from None
    role = cells.get("role", "").lower() or "train"
    if role not in ROLES:
        raise FormatError(csv_path, line, "role", f"{cells['role']!r} is not one of {', '.join(ROLES)}")
    if role == "distractor" and domain != "shop":
        raise FormatError(csv_path, line, "role", "a distractor is a gallery image: its domain must be shop")
    box_texts = [cells.get(name, "") for name in BOX_COLUMNS]
    if any(box_texts):
        empty = next((name for name, text in zip(BOX_COLUMNS, box_texts, strict=True) if not text), None)
        if empty is not None:
            raise FormatError(
                csv_path, line, empty, "empty while other box fields are given (all four or none)"
            )
        box = parse_box(box_texts, csv_path, line)
    else:
        box = _whole_image_box(image, csv_path, line)
    return _Row(line, ImageRef(image.as_uri(), box), cells["identity"], domain, category, role)


def _whole_image_box(image: Path, csv_path: Path, line: int) -> Box:
    """The displayed image's full extent, from the header alone (no pixel decoding)."""
    try:
        with Image.open(image) as opened:
            width, height = opened.size
            orientation = opened.getexif().get(ExifTags.Base.Orientation, 1)
    except _UNREADABLE_IMAGE as error:
        raise FormatError(csv_path, line, "path", f"not a readable image: {image}: {error}") from None
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return Box(0, 0, width, height)


def _check_consistency(rows: Sequence[_Row], csv_path: str | Path) -> None:
    """One category per identity, train and test kept apart, one identity and domain per image."""
    first_of_identity: dict[str, _Row] = {}
    side_of_identity: dict[str, _Row] = {}  # the identity's first train or test row
    for row in rows:
        first_of_identity.setdefault(row.identity, row)
        if row.role != "distractor":
            side_of_identity.setdefault(row.identity, row)
    rows_of_url: dict[str, list[_Row]] = {}
    for row in rows:
        earlier = rows_of_url.setdefault(row.ref.url, [])
        conflict = _identity_conflict(
            row, first_of_identity[row.identity], side_of_identity.get(row.identity)
        ) or _image_conflict(row, earlier)
        if conflict is not None:
            raise FormatError(csv_path, row.line, *conflict)
        earlier.append(row)


def _identity_conflict(row: _Row, first: _Row, side: _Row | None) -> tuple[str, str] | None:
    """(field, problem) when ``row`` disagrees with its identity's first row or train/test side."""
    name = repr(row.identity)
    if row.category != first.category:
        return "category", f"identity {name} is {first.category.label} on line {first.line}"
    if side is None or row.role == side.role or (row.role, side.role) == ("distractor", "train"):
        return None
    if row.role == "distractor":
        return (
            "role",
            f"identity {name} is test (line {side.line}), so its images are matches, not distractors",
        )
    return "role", f"identity {name} is {side.role} on line {side.line}; an identity is either train or test"


def _image_conflict(row: _Row, earlier_rows: Sequence[_Row]) -> tuple[str, str] | None:
    """(field, problem) when the same image was listed before, other than as train plus distractor."""
    for earlier in earlier_rows:
        if earlier.identity != row.identity:
            return "identity", f"same image as line {earlier.line}, which is identity {earlier.identity!r}"
        if earlier.domain != row.domain:
            return "domain", f"same image as line {earlier.line}, which is {earlier.domain}"
        if {earlier.role, row.role} != {"train", "distractor"}:
            return (
                "path",
                f"repeats line {earlier.line} (only a train and a distractor row may share an image)",
            )
    return None


def _group(rows: Iterable[_Row]) -> dict[str, list[_Row]]:
    groups: dict[str, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.identity, []).append(row)
    return groups


def _split_domains(members: Sequence[_Row]) -> tuple[list[_Row], list[_Row]]:
    return [r for r in members if r.domain == "consumer"], [r for r in members if r.domain == "shop"]


def grocery_iconic_images(root: Path) -> dict[int, tuple[str, Path]]:
    """classes.csv -> {class id: (class name, iconic image path)}."""
    classes_path = root / "classes.csv"
    reader = csv.reader(io.StringIO(read_text(classes_path), newline=""))
    header = next(reader, [])
    if (
        len(header) < 5
        or not header[1].startswith("Class ID")
        or not header[4].startswith("Iconic Image Path")
    ):
        raise FormatError(classes_path, 1, "header", "expected Class Name,Class ID,...,Iconic Image Path,...")
    iconic = {}
    for record in reader:
        if not record:
            continue
        class_id = _grocery_class_id(record[1], classes_path, reader.line_num, "Class ID")
        iconic[class_id] = (record[0], root / record[4].lstrip("/"))
    return iconic


def _grocery_photos(list_path: Path, class_ids: Collection[int]) -> list[tuple[int, Path]]:
    """train.txt / val.txt / test.txt lines ``relative/path.jpg, fine id, coarse id``."""
    photos = []
    for line, text in enumerate(read_text(list_path).split("\n"), start=1):
        if not text.strip():
            continue
        fields = [field.strip() for field in text.split(",")]
        if len(fields) != 3:
            raise FormatError(
                list_path,
                line,
                "field count",
                f"expected 3 fields (path, fine id, coarse id), got {len(fields)}",
            )
        class_id = _grocery_class_id(fields[1], list_path, line, "fine id")
        if class_id not in class_ids:
            raise FormatError(list_path, line, "fine id", f"class {class_id} is not in classes.csv")
        photos.append((class_id, list_path.parent / fields[0]))
    return photos


def _grocery_class_id(text: str, path: Path, line: int, field: str) -> int:
    if not text.strip().isdigit():
        raise FormatError(path, line, field, f"not an integer: {text!r}")
    return int(text)
