"""The synthetic demo set: official layout, determinism, true boxes, a task not solvable by colour alone."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from jdfashion.baseline import color_histogram_features
from jdfashion.data.demo import DEMO_HOST, DemoConfig, DemoSummary, make_demo
from jdfashion.data.images import load_image, load_item, url_to_path
from jdfashion.data.jdformat import Category, ImageRef, read_images, read_pairs, read_truth
from jdfashion.paths import DataLayout

SMALL = DemoConfig(train_identities=3, test_identities=4, consumer_photos=2, distractors=2, image_size=96)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    return make_demo(tmp_path_factory.mktemp("demo"), SMALL)


def category_of(url: str) -> Category:
    assert url.startswith(f"http://{DEMO_HOST}/")
    return Category.parse(url.split("/")[3])


def all_refs(layout: DataLayout) -> list[ImageRef]:
    pairs = read_pairs(layout.pairs)
    refs = {ref.url: ref for pair in pairs for ref in (pair.consumer, pair.shop)}
    refs.update((ref.url, ref) for ref in read_images(layout.queries) + read_images(layout.gallery))
    return list(refs.values())


def file_contents(root: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()
    }


def thumbnail(ref: ImageRef, image_root: Path, side: int = 16) -> np.ndarray:
    """A zero-mean unit vector of the box crop at a fixed size: the crudest appearance feature."""
    crop = cv2.resize(
        load_item(ref, image_root).astype(np.float32), (side, side), interpolation=cv2.INTER_AREA
    )
    vector = crop.ravel() - crop.mean()
    return vector / np.linalg.norm(vector)


def test_lists_parse_with_the_expected_counts_and_disjoint_roles(demo: DemoSummary) -> None:
    layout = demo.layout
    assert layout.queries.name == "q_all.txt"
    pairs, queries = read_pairs(layout.pairs), read_images(layout.queries)
    gallery, truth = read_images(layout.gallery), read_truth(layout.truth)
    photos = SMALL.consumer_photos
    for category in Category:
        assert sum(p.category is category for p in pairs) == SMALL.train_identities * photos
        assert sum(category_of(q.url) is category for q in queries) == SMALL.test_identities * photos
        assert (
            sum(category_of(g.url) is category for g in gallery) == SMALL.test_identities + SMALL.distractors
        )
        expected = (SMALL.train_identities * photos, SMALL.test_identities * photos)
        counted = demo.counts[category]
        assert (counted.train_pairs, counted.queries) == expected
        assert counted.gallery == SMALL.test_identities + SMALL.distractors
    assert all(category_of(p.consumer.url) is p.category is category_of(p.shop.url) for p in pairs)
    assert len({p.shop.url for p in pairs}) == 3 * SMALL.train_identities
    assert list(truth) == [q.url for q in queries]
    gallery_urls = {g.url for g in gallery}
    for query in queries:
        assert len(truth[query.url]) == 1
        assert truth[query.url][0] in gallery_urls
        assert category_of(truth[query.url][0]) is category_of(query.url)
    # Test identities appear nowhere in training, and no query is its own answer.
    training_urls = {ref.url for p in pairs for ref in (p.consumer, p.shop)}
    assert not training_urls & (gallery_urls | {q.url for q in queries})
    assert not gallery_urls & {q.url for q in queries}
    # Every image an entry names exists, and nothing else was written.
    images = file_contents(layout.images)
    assert demo.images == len(images) == len(all_refs(layout))
    assert all(url_to_path(ref.url, layout.images).is_file() for ref in all_refs(layout))


def test_files_use_crlf_and_order_is_shuffled(demo: DemoSummary) -> None:
    for path in (demo.layout.pairs, demo.layout.queries, demo.layout.gallery, demo.layout.truth):
        data = path.read_bytes()
        assert data.count(b"\r\n") == data.count(b"\n") > 0
    categories = [category_of(ref.url) for ref in read_images(demo.layout.gallery)]
    assert categories != sorted(categories)


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(demo: DemoSummary, tmp_path: Path) -> None:
    again = make_demo(tmp_path / "again", SMALL)
    assert file_contents(again.layout.root) == file_contents(demo.layout.root)
    other = make_demo(tmp_path / "other", replace(SMALL, seed=1))
    assert other.layout.pairs.read_bytes() != demo.layout.pairs.read_bytes()
    assert other.layout.gallery.read_bytes() != demo.layout.gallery.read_bytes()
    assert not set(file_contents(other.layout.images).values()) & set(
        file_contents(demo.layout.images).values()
    )


def test_more_training_identities_leave_the_test_set_unchanged(demo: DemoSummary, tmp_path: Path) -> None:
    bigger = make_demo(tmp_path, replace(SMALL, train_identities=SMALL.train_identities + 2))
    assert bigger.layout.gallery.read_bytes() == demo.layout.gallery.read_bytes()
    assert bigger.layout.truth.read_bytes() == demo.layout.truth.read_bytes()


def test_every_image_decodes_and_its_box_is_inside_it(demo: DemoSummary) -> None:
    for ref in all_refs(demo.layout):
        width, height = load_image(url_to_path(ref.url, demo.layout.images)).size
        box = ref.box
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height, ref
        if "_consumer_" in ref.url:
            # A consumer photo shows the item among background, not filling the frame.
            assert (box.x2 - box.x1) * (box.y2 - box.y1) < 0.8 * width * height, ref


def test_shop_boxes_are_tight_around_the_item_on_white(demo: DemoSummary) -> None:
    for ref in read_images(demo.layout.gallery):
        darkest = np.asarray(load_image(url_to_path(ref.url, demo.layout.images))).min(axis=2).astype(int)
        box = ref.box
        outside = np.ones(darkest.shape, dtype=bool)
        outside[max(0, box.y1 - 1) : box.y2 + 1, max(0, box.x1 - 1) : box.x2 + 1] = False
        assert darkest[outside].min() > 225, f"{ref.url}: item pixels outside its box"
        edges = (
            darkest[box.y1, box.x1 : box.x2],
            darkest[box.y2 - 1, box.x1 : box.x2],
            darkest[box.y1 : box.y2, box.x1],
            darkest[box.y1 : box.y2, box.x2 - 1],
        )
        assert all(edge.min() < 200 for edge in edges), f"{ref.url}: box is not tight on every side"


def test_a_consumer_crop_looks_more_like_its_shop_image_than_like_other_categories(demo: DemoSummary) -> None:
    image_root = demo.layout.images
    queries, gallery = read_images(demo.layout.queries), read_images(demo.layout.gallery)
    truth = read_truth(demo.layout.truth)
    similarity = (
        np.stack([thumbnail(q, image_root) for q in queries])
        @ np.stack([thumbnail(g, image_root) for g in gallery]).T
    )
    own, other_category, wins = [], [], []
    for row, query in enumerate(queries):
        mine = [similarity[row, col] for col, g in enumerate(gallery) if g.url in truth[query.url]]
        others = [
            similarity[row, col]
            for col, g in enumerate(gallery)
            if category_of(g.url) is not category_of(query.url)
        ]
        own.extend(mine)
        other_category.extend(others)
        wins.append(np.mean(mine) > np.mean(others))
    assert np.mean(own) > np.mean(other_category) + 0.1
    assert np.mean(wins) > 0.6


def test_each_category_holds_colour_twins_that_differ_in_detail(demo: DemoSummary) -> None:
    """Siblings share their colours, so a colour histogram confuses items that differ only in pattern."""
    gallery = read_images(demo.layout.gallery)
    histograms = color_histogram_features(gallery, demo.layout.images).features
    for category in Category:
        members = [i for i, ref in enumerate(gallery) if category_of(ref.url) is category]
        similarity = histograms[members] @ histograms[members].T
        np.fill_diagonal(similarity, -1.0)
        first, second = np.unravel_index(similarity.argmax(), similarity.shape)
        off_diagonal = similarity[~np.eye(len(members), dtype=bool)]
        assert similarity[first, second] > np.median(off_diagonal) + 0.2
        crops = [load_item(gallery[members[i]], demo.layout.images) for i in (first, second)]
        side = (64, 64)
        resized = [cv2.resize(crop, side, interpolation=cv2.INTER_AREA).astype(int) for crop in crops]
        assert np.abs(resized[0] - resized[1]).mean() > 8


def test_a_demo_set_is_regenerated_in_place_but_other_lists_are_kept(tmp_path: Path) -> None:
    first = make_demo(tmp_path, SMALL)
    before = file_contents(tmp_path)
    make_demo(tmp_path, SMALL)
    assert file_contents(tmp_path) == before
    real = b"http://img14.360buyimg.com/a.jpg 1 2 30 40\r\n"
    first.layout.gallery.write_bytes(real)
    with pytest.raises(FileExistsError, match=r"s\.txt"):
        make_demo(tmp_path, SMALL)
    assert first.layout.gallery.read_bytes() == real
    make_demo(tmp_path, SMALL, overwrite=True)
    assert file_contents(tmp_path) == before


@pytest.mark.parametrize(
    ("field", "value"), [("image_size", 32), ("test_identities", 0), ("consumer_photos", 0), ("seed", -1)]
)
def test_config_rejects_unusable_values(field: str, value: int) -> None:
    with pytest.raises(ValueError, match=field):
        DemoConfig(**{field: value})
