"""Identities from the url graph and the seeded train / validation split, on generated p.txt files."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from jdfashion.data.jdformat import (
    Box,
    Category,
    ImageRef,
    Pair,
    read_images,
    read_pairs,
    read_truth,
    write_pairs,
)
from jdfashion.data.split import identities, make_split, training_identities
from jdfashion.paths import DataLayout

BOX = Box(0, 0, 10, 10)


def pair(consumer: str, shop: str, category: Category = Category.CLOTHES) -> Pair:
    return Pair(ImageRef(f"u/{consumer}.jpg", BOX), ImageRef(f"s/{shop}.jpg", BOX), category)


def write_generated_pairs(path: Path, counts: dict[Category, int]) -> list[Pair]:
    """Identities of 1-3 consumer photos and 1-2 shop images, categories interleaved line by line."""
    pairs = []
    for index in range(max(counts.values())):
        for category, count in counts.items():
            if index < count:
                name = f"{category.label}{index}"
                consumers = [f"{name}{letter}" for letter in "abc"[: 1 + index % 3]]
                shops = [f"{name}{letter}" for letter in "xy"[: 1 + index % 2]]
                # The first photo matches every shop image, the others the first one: one component.
                pairs += [pair(consumers[0], shop, category) for shop in shops]
                pairs += [pair(consumer, shops[0], category) for consumer in consumers[1:]]
    write_pairs(path, pairs)
    return pairs


def urls_of_split(layout: DataLayout) -> tuple[set[str], dict[Category, set[str]]]:
    train = {ref.url for p in read_pairs(layout.train_pairs) for ref in (p.consumer, p.shop)}
    held_out = {
        category: {r.url for f in (layout.val_queries, layout.val_gallery) for r in read_images(f(category))}
        for category in Category
        if layout.val_queries(category).exists()
    }
    return train, held_out


def test_identities_are_components_within_a_category() -> None:
    found = identities(
        [
            pair("c1", "s1"),
            pair("c2", "s2"),
            pair("c3", "s1"),
            pair("c1", "s9", Category.BAGS),  # same photo, another item: its own identity
            pair("c4", "s3"),
            pair("c2", "s3"),  # joins the c2 and c4 components
            pair("c3", "s1"),  # a repeated line changes nothing
        ]
    )
    summary = [
        (i.category, [r.url for r in i.consumers], [r.url for r in i.shops], len(i.pairs)) for i in found
    ]
    assert summary == [
        (Category.CLOTHES, ["u/c1.jpg", "u/c3.jpg"], ["s/s1.jpg"], 3),
        (Category.CLOTHES, ["u/c2.jpg", "u/c4.jpg"], ["s/s2.jpg", "s/s3.jpg"], 3),
        (Category.BAGS, ["u/c1.jpg"], ["s/s9.jpg"], 1),
    ]
    assert identities([]) == []


def test_split_keeps_identities_whole_and_files_consistent(tmp_path: Path) -> None:
    counts = {Category.CLOTHES: 40, Category.BAGS: 10, Category.SHOES: 1}
    pairs = write_generated_pairs(tmp_path / "p.txt", counts)
    layout = DataLayout(tmp_path)
    summary = make_split(layout.pairs, layout, val_fraction=0.2, distractor_fraction=0.1, seed=3)

    train_urls, held_out = urls_of_split(layout)
    assert set(held_out) == {Category.CLOTHES, Category.BAGS}
    rows = {row.category: row for row in summary.categories}
    for category, held in held_out.items():
        assert not train_urls & held
        truth = read_truth(layout.val_truth(category))
        queries = [r.url for r in read_images(layout.val_queries(category))]
        gallery = {r.url for r in read_images(layout.val_gallery(category))}
        assert list(truth) == queries
        assert all(set(matches) <= gallery for matches in truth.values())
        everything = identities([p for p in pairs if p.category == category])
        by_query = {c.url: {s.url for s in i.shops} for i in everything for c in i.consumers}
        assert {q: set(m) for q, m in truth.items()} == {q: by_query[q] for q in queries}
        row = rows[category]
        assert row.train_identities + row.val_identities + row.distractor_identities == counts[category]
        assert (row.val_identities, row.distractor_identities) == (
            round(counts[category] * 0.2),
            round(counts[category] * 0.1),
        )
        assert (row.val_queries, row.gallery) == (len(queries), len(gallery))
        assert row.distractors == len(gallery - {url for m in truth.values() for url in m}) > 0
    assert rows[Category.SHOES].train_identities == 1
    assert summary.train_pairs == len(read_pairs(layout.train_pairs))

    labelled = training_identities(layout, Category.BAGS)
    assert len(labelled) == rows[Category.BAGS].train_identities
    assert all(i.category == Category.BAGS and not i.urls & held_out[Category.BAGS] for i in labelled)
    console = Console(record=True, width=120)
    console.print(summary.as_table())
    table_rows = {
        line.split()[1]: line.split()[3::2] for line in console.export_text().splitlines() if "│" in line
    }
    assert table_rows["clothes"][:4] == ["40", "28", "8", "4"]
    assert table_rows["shoes"][:3] == ["1", "1", "0"]


def test_split_is_deterministic_by_seed(tmp_path: Path) -> None:
    write_generated_pairs(tmp_path / "p.txt", {Category.CLOTHES: 30, Category.BAGS: 12, Category.SHOES: 5})

    def split_bytes(name: str, seed: int) -> dict[str, bytes]:
        layout = DataLayout(tmp_path / name)
        make_split(tmp_path / "p.txt", layout, seed=seed)
        return {str(f.relative_to(layout.root)): f.read_bytes() for f in sorted(layout.root.rglob("*.txt"))}

    first = split_bytes("a", seed=7)
    assert first == split_bytes("b", seed=7)
    other = split_bytes("c", seed=8)
    assert other.keys() == first.keys()
    assert other["split/train.txt"] != first["split/train.txt"]


def test_small_categories_and_stale_files(tmp_path: Path) -> None:
    write_generated_pairs(tmp_path / "p.txt", {Category.CLOTHES: 2, Category.BAGS: 1})
    layout = DataLayout(tmp_path)
    stale = layout.val_queries(Category.BAGS)
    stale.parent.mkdir(parents=True)
    stale.write_text("from an earlier split\n")
    summary = make_split(layout.pairs, layout, val_fraction=0.05, distractor_fraction=0.3)
    clothes, bags, shoes = summary.categories
    assert (clothes.val_identities, clothes.distractor_identities, clothes.train_identities) == (1, 0, 1)
    assert (bags.val_identities, bags.train_identities, shoes.identities) == (0, 1, 0)
    assert not stale.exists()
    assert not layout.val_dir(Category.SHOES).exists()


def test_extra_distractors_join_every_gallery_once(tmp_path: Path) -> None:
    pairs = write_generated_pairs(tmp_path / "p.txt", {Category.CLOTHES: 6, Category.SHOES: 6})
    layout = DataLayout(tmp_path)
    # Duplicates, and urls of validation queries and matches, which must not become distractors.
    extra = [ImageRef("http://gallery/1.jpg", BOX), ImageRef("http://gallery/1.jpg", BOX)]
    extra += [ref for p in pairs for ref in (p.consumer, p.shop)]
    summary = make_split(layout.pairs, layout, distractor_fraction=0.0, extra_distractors=extra)
    assert [row.category for row in summary.categories if row.val_identities] == [
        Category.CLOTHES,
        Category.SHOES,
    ]
    for row in summary.categories[::2]:
        gallery = [r.url for r in read_images(layout.val_gallery(row.category))]
        truth = read_truth(layout.val_truth(row.category))
        matches = {url for m in truth.values() for url in m}
        expected_distractors = {ref.url for ref in extra} - matches - set(truth)
        assert len(gallery) == len(set(gallery))
        assert set(gallery) == matches | expected_distractors
        assert row.distractors == len(expected_distractors)


def test_cross_category_photo_never_leaks_into_training(tmp_path: Path) -> None:
    """One photo showing a top and a bag: if the top is held out, the bag cannot be trained on."""
    shared = [pair(f"photo{i}", f"top{i}") for i in range(4)]
    shared += [pair(f"photo{i}", f"bag{i}", Category.BAGS) for i in range(4)]
    write_pairs(tmp_path / "p.txt", shared)
    dropped = 0
    for seed in range(6):
        layout = DataLayout(tmp_path / str(seed))
        summary = make_split(tmp_path / "p.txt", layout, val_fraction=0.25, distractor_fraction=0, seed=seed)
        train_urls, held_out = urls_of_split(layout)
        assert not train_urls & set().union(*held_out.values())
        for row in summary.categories[:2]:
            assert row.train_identities + row.val_identities + row.overlap_dropped == 4
        dropped += sum(row.overlap_dropped for row in summary.categories)
    assert dropped > 0


@pytest.mark.parametrize(("val", "distractor"), [(0.0, 0.1), (1.0, 0.0), (0.5, 0.5), (0.2, -0.1)])
def test_rejects_impossible_fractions(tmp_path: Path, val: float, distractor: float) -> None:
    write_generated_pairs(tmp_path / "p.txt", {Category.CLOTHES: 3})
    with pytest.raises(ValueError, match="val_fraction"):
        make_split(tmp_path / "p.txt", DataLayout(tmp_path), val_fraction=val, distractor_fraction=distractor)


def test_training_identities_needs_a_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="jdfashion data split"):
        training_identities(DataLayout(tmp_path), Category.CLOTHES)
