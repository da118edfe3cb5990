"""The Grocery Store protocol's data: manifest -> official layout -> validation split (docs/REALDATA.md).

Validation identities are packaged products (classes 28-42), because the test is packaged products
(43-58): what is chosen on validation (the best epoch, the WiSE-FT mix, fusion weights) should be
chosen on images that resemble the test, not on fruit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.data.images import load_item
from jdfashion.data.jdformat import (
    Box,
    ImageRef,
    read_images,
    read_pairs,
    read_truth,
    write_images,
    write_pairs,
    write_truth,
)
from jdfashion.data.manifest import GROCERY_CATEGORY, grocery_iconic_images, grocery_manifest, import_manifest
from jdfashion.data.split import Identity, make_split, training_identities
from jdfashion.paths import DataLayout

# Packaged products the training side owns; validation draws from these.
GROCERY_VAL_POOL = tuple(range(28, 43))
# A third of the 15 packages (5) validate; 60 identities (50 produce + 10 packages) remain to train.
VAL_FRACTION = 1 / 3
SPLIT_SEED = 0
# The rotated-query variant (issue 11): each test query turned by a seeded angle in [-90, 90] degrees,
# and each validation query (fold 0) by the next seed's angles, recorded in (val-)angles.json.
ROTATED_DIR = "rotated"
ROTATION_SEED = 0
MAX_QUERY_ROTATION = 90.0
ANGLES_FILE = "angles.json"
VALIDATION_PREFIX = "val-"
# Validation folds: the protocol's 5 validation packages are fold 0; the 10 training packages make
# folds 1 and 2 (under DATA/folds/<k>/, each a data root of its own validation lists). A pipeline that
# trains nothing (frozen networks, test-time options, their fusion) has seen none of them, so it is
# validated on all 15 packages; a trained model only on fold 0.
FOLDS_DIR = "folds"
VALIDATION_FOLDS = 3


@dataclass(frozen=True)
class Protocol:
    """The sizes of what was built, so the report states the split it was computed on."""

    data_root: str
    train_identities: int
    val_identities: int
    val_queries: int
    val_gallery: int
    test_identities: int
    test_queries: int
    test_gallery: int
    test_distractors: int
    train_images: int = 0
    val_classes: tuple[str, ...] = ()
    fold_queries: tuple[int, ...] = ()  # queries of each validation fold, fold 0 first


def build_protocol(
    dataset: Path,
    data_root: Path,
    max_queries: int | None = None,
    max_train_photos: int | None = None,
) -> Protocol:
    """Manifest -> official layout -> validation split; the validation gallery is all 81 iconic images,
    as the test gallery is, so tuning sees the same distractors the test does. ``max_queries`` and
    ``max_train_photos`` (per identity) thin the lists for tests and the CI smoke run."""
    manifest = data_root / "grocery-manifest.csv"
    grocery_manifest(dataset, manifest)
    summary = import_manifest(manifest, data_root)
    layout = DataLayout(data_root)
    if max_queries is not None:
        _thin_queries(layout.queries, layout.truth, max_queries)
    pool_suffixes = tuple(
        "/" + path.relative_to(Path(dataset).absolute()).as_posix()
        for class_id, (_, path) in grocery_iconic_images(Path(dataset).absolute()).items()
        if class_id in GROCERY_VAL_POOL
    )

    def is_package(identity: Identity) -> bool:
        return any(ref.url.endswith(pool_suffixes) for ref in identity.shops)

    split = make_split(
        layout.pairs,
        layout,
        val_fraction=VAL_FRACTION,
        distractor_fraction=0.0,
        seed=SPLIT_SEED,
        extra_distractors=read_images(layout.gallery),
        val_pool=is_package,
    )
    if max_queries is not None:
        _thin_queries(layout.val_queries(GROCERY_CATEGORY), layout.val_truth(GROCERY_CATEGORY), max_queries)
    if max_train_photos is not None:
        _thin_training(layout, max_train_photos)
    (val,) = [row for row in split.categories if row.category == GROCERY_CATEGORY]
    folds = [layout, *_write_folds(layout, is_package, max_queries)]
    truth = read_truth(layout.val_truth(GROCERY_CATEGORY))
    train_pairs = read_pairs(layout.train_pairs)
    return Protocol(
        data_root=str(data_root),
        train_identities=val.train_identities,
        val_identities=val.val_identities,
        val_queries=len(read_images(layout.val_queries(GROCERY_CATEGORY))),
        val_gallery=val.gallery,
        test_identities=summary.test_identities,
        test_queries=len(read_images(layout.queries)),
        test_gallery=summary.gallery,
        test_distractors=summary.distractors,
        train_images=len({ref.url for pair in train_pairs for ref in (pair.consumer, pair.shop)}),
        val_classes=tuple(sorted({Path(url).parent.name for urls in truth.values() for url in urls})),
        fold_queries=tuple(len(read_images(fold.val_queries(GROCERY_CATEGORY))) for fold in folds),
    )


def fold_layouts(data_root: Path) -> list[DataLayout]:
    """The validation folds' data roots, fold 0 (the protocol's own validation) first."""
    extra = sorted((data_root / FOLDS_DIR).glob("*"), key=lambda path: int(path.name))
    return [DataLayout(data_root), *(DataLayout(path) for path in extra)]


def _write_folds(
    layout: DataLayout, is_package: Callable[[Identity], bool], max_queries: int | None
) -> list[DataLayout]:
    """Folds 1.. from the training packages (in shop-url order, split evenly), each with fold 0's
    gallery (all 81 iconic images): validation lists for pipelines that train nothing."""
    packages = sorted(
        (i for i in training_identities(layout, GROCERY_CATEGORY) if is_package(i)),
        key=lambda identity: identity.shops[0].url,
    )
    gallery = read_images(layout.val_gallery(GROCERY_CATEGORY))
    folds = []
    for number, members in enumerate(np.array_split(np.arange(len(packages)), VALIDATION_FOLDS - 1), 1):
        fold = DataLayout(layout.root / FOLDS_DIR / str(number))
        chosen = [packages[index] for index in members]
        write_images(fold.val_queries(GROCERY_CATEGORY), [ref for i in chosen for ref in i.consumers])
        write_images(fold.val_gallery(GROCERY_CATEGORY), gallery)
        write_truth(
            fold.val_truth(GROCERY_CATEGORY),
            {ref.url: [shop.url for shop in i.shops] for i in chosen for ref in i.consumers},
        )
        if max_queries is not None:
            _thin_queries(fold.val_queries(GROCERY_CATEGORY), fold.val_truth(GROCERY_CATEGORY), max_queries)
        folds.append(fold)
    return folds


def _thin_queries(queries_path: Path, truth_path: Path, max_queries: int) -> None:
    """Keep ``max_queries`` evenly spaced queries (every identity stays represented) for micro runs."""
    queries = read_images(queries_path)
    if len(queries) <= max_queries:
        return
    kept = [queries[round(i * len(queries) / max_queries)] for i in range(max_queries)]
    truth = read_truth(truth_path)
    write_images(queries_path, kept)
    write_truth(truth_path, {ref.url: truth[ref.url] for ref in kept})


def _thin_training(layout: DataLayout, per_identity: int) -> None:
    """Keep the first ``per_identity`` consumer photos of each shop image in the training list."""
    kept, counts = [], {}
    for pair in read_pairs(layout.train_pairs):
        counts[pair.shop.url] = counts.get(pair.shop.url, 0) + 1
        if counts[pair.shop.url] <= per_identity:
            kept.append(pair)
    write_pairs(layout.train_pairs, kept)


def build_rotated_queries(data_root: Path, seed: int = ROTATION_SEED) -> DataLayout:
    """The test queries, each photo turned in-plane by a seeded angle in [-90, 90] degrees
    (counter-clockwise positive; the canvas grows so nothing is cut off, corners black), with the test
    truth: consumer photos taken at an angle, which the paper's annular parts are meant for. The
    protocol's validation queries (fold 0) are turned the same way by the angles of seed ``seed + 1``,
    beside the validation gallery, so that a rotation option can be chosen on turned photos without
    the test's. Written under ``data_root/rotated`` once; a rerun with the same queries and seed
    reuses them."""
    layout, rotated = DataLayout(data_root), DataLayout(data_root / ROTATED_DIR)
    _turn_queries(layout, rotated, seed, validation=False)
    _turn_queries(layout, rotated, seed + 1, validation=True)
    val = GROCERY_CATEGORY
    write_images(rotated.val_gallery(val), read_images(layout.val_gallery(val)))
    return rotated


def _lists(layout: DataLayout, validation: bool) -> tuple[Path, Path]:
    """The test's or fold 0's validation query and truth lists of ``layout``."""
    if validation:
        return layout.val_queries(GROCERY_CATEGORY), layout.val_truth(GROCERY_CATEGORY)
    return layout.queries, layout.truth


def _turn_queries(layout: DataLayout, rotated: DataLayout, seed: int, validation: bool) -> None:
    """``layout``'s test (or validation) queries turned by seeded angles into ``rotated``'s lists, each
    photo saved in ``rotated``'s images and the angles recorded beside them (validation's under
    ``VALIDATION_PREFIX``); a rerun with the same queries and seed writes nothing."""
    (source, source_truth), (target, target_truth) = _lists(layout, validation), _lists(rotated, validation)
    prefix = VALIDATION_PREFIX if validation else ""
    queries, truth = read_images(source), read_truth(source_truth)
    angles = np.random.default_rng(seed).uniform(-MAX_QUERY_ROTATION, MAX_QUERY_ROTATION, len(queries))
    record = {"seed": seed, "sources": [ref.url for ref in queries], "angles": angles.round(3).tolist()}
    record_path = rotated.root / f"{prefix}{ANGLES_FILE}"
    if record_path.exists() and json.loads(record_path.read_text()) == record and target_truth.exists():
        return
    refs, turned_truth = [], {}
    for number, (ref, angle) in enumerate(zip(queries, record["angles"], strict=True)):
        photo = Image.fromarray(load_item(ref, layout.images))
        turned = photo.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=(0, 0, 0))
        path = rotated.images / f"{prefix}{number:05d}_{Path(ref.url).stem}.jpg"
        with atomic_path(path) as tmp:
            turned.save(tmp, format="JPEG", quality=95)
        url = path.absolute().as_uri()
        refs.append(ImageRef(url, Box(0, 0, turned.width, turned.height)))
        turned_truth[url] = truth[ref.url]
    write_images(target, refs)
    write_truth(target_truth, turned_truth)
    atomic_write_text(record_path, json.dumps(record))
