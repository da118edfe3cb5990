"""Identities from p.txt and the train / validation split that local scoring needs.

JD never published the test ground truth, so validation is carved out of p.txt. An identity is a
connected component of the consumer-url / shop-url graph within one category: two photos matched to
the same shop image show the same item, so they must stay on the same side of the split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.table import Table
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components

from jdfashion.data.jdformat import (
    Category,
    ImageRef,
    Pair,
    read_pairs,
    write_images,
    write_pairs,
    write_truth,
)
from jdfashion.paths import DataLayout, fixing_command


@dataclass(frozen=True)
class Identity:
    """One item: every consumer photo and shop image of it (unique by url, first-seen order)."""

    category: Category
    consumers: tuple[ImageRef, ...]
    shops: tuple[ImageRef, ...]
    pairs: tuple[Pair, ...]

    @property
    def urls(self) -> set[str]:
        return {ref.url for ref in (*self.consumers, *self.shops)}


@dataclass(frozen=True)
class CategorySplit:
    """How one category was split.

    ``overlap_dropped`` counts training identities left out because they share a url with a held-out
    identity of another category (one photo showing two items), which would leak into validation.
    """

    category: Category
    identities: int
    train_identities: int
    val_identities: int
    distractor_identities: int
    overlap_dropped: int
    val_queries: int
    gallery: int
    distractors: int


@dataclass(frozen=True)
class SplitSummary:
    seed: int
    train_pairs: int
    categories: tuple[CategorySplit, ...]

    def as_table(self) -> Table:
        table = Table(title=f"split (seed {self.seed}, {self.train_pairs} training pairs)")
        columns = {
            "ids": "identities",
            "train": "train_identities",
            "val": "val_identities",
            "distr.": "distractor_identities",
            "dropped": "overlap_dropped",
            "queries": "val_queries",
            "gallery": "gallery",
            "distr. imgs": "distractors",
        }
        table.add_column("category", no_wrap=True)
        for header in columns:
            table.add_column(header, justify="right")
        for row in self.categories:
            table.add_row(row.category.label, *(str(getattr(row, name)) for name in columns.values()))
        table.caption = "ids = identities; distr. = identities giving only gallery distractors"
        return table


def identities(pairs: Sequence[Pair]) -> list[Identity]:
    """Connected components of the url graph per category, ordered by first appearance in ``pairs``."""
    if not pairs:
        return []
    node_of: dict[tuple[Category, str], int] = {}
    edges = [
        (
            node_of.setdefault((pair.category, pair.consumer.url), len(node_of)),
            node_of.setdefault((pair.category, pair.shop.url), len(node_of)),
        )
        for pair in pairs
    ]
    rows, cols = zip(*edges, strict=True)
    graph = coo_array((np.ones(len(edges)), (rows, cols)), shape=(len(node_of), len(node_of)))
    _, component_of_node = connected_components(graph, directed=False)
    members: dict[int, list[Pair]] = {}
    for pair, (consumer_node, _) in zip(pairs, edges, strict=True):
        members.setdefault(int(component_of_node[consumer_node]), []).append(pair)
    return [_identity(group) for group in members.values()]


def make_split(
    pairs_path: str | Path,
    out: DataLayout,
    val_fraction: float = 0.2,
    distractor_fraction: float = 0.1,
    seed: int = 0,
    extra_distractors: Sequence[ImageRef] | None = None,
    val_pool: Callable[[Identity], bool] | None = None,
) -> SplitSummary:
    """Write ``out.train_pairs`` and per category the validation queries, gallery and truth.

    Per category, ``val_fraction`` of the identities become validation identities (their consumer
    photos are queries, their shop images the matches) and ``distractor_fraction`` more give only
    their shop images to the gallery. ``extra_distractors`` (uncategorised, e.g. s.txt images) join
    every category's gallery. A category with at least two identities always gets one validation
    identity and keeps one for training. ``val_pool`` restricts validation to the identities it
    accepts (``val_fraction`` is then a fraction of those), so validation can resemble the test
    (e.g. packaged products when the test is packaged products). Same inputs and seed give
    byte-identical files.
    """
    if not 0 < val_fraction < 1 or not 0 <= distractor_fraction < 1 - val_fraction:
        raise ValueError(
            f"need 0 < val_fraction < 1 and 0 <= distractor_fraction < 1 - val_fraction, "
            f"got {val_fraction} and {distractor_fraction}"
        )
    pairs = read_pairs(pairs_path)
    if not pairs:
        raise ValueError(
            f"{pairs_path}: lists no pairs; import your data: {fixing_command(Path(pairs_path))}"
        )
    by_category = {category: [] for category in Category}
    for identity in identities(pairs):
        by_category[identity.category].append(identity)

    held_out: dict[Category, tuple[list[Identity], list[Identity]]] = {}
    train: dict[Category, list[Identity]] = {}
    for category, members in by_category.items():
        val, distractor, train[category] = _assign(
            members, val_fraction, distractor_fraction, seed, category, val_pool
        )
        held_out[category] = (val, distractor)

    held_out_urls = {url for groups in held_out.values() for group in groups for i in group for url in i.urls}
    kept = {c: [i for i in members if not i.urls & held_out_urls] for c, members in train.items()}
    write_pairs(out.train_pairs, [pair for members in kept.values() for i in members for pair in i.pairs])

    rows = []
    for category, (val, distractor) in held_out.items():
        gallery_size = _write_validation(out, category, val, distractor, extra_distractors or ())
        rows.append(
            CategorySplit(
                category=category,
                identities=len(by_category[category]),
                train_identities=len(kept[category]),
                val_identities=len(val),
                distractor_identities=len(distractor),
                overlap_dropped=len(train[category]) - len(kept[category]),
                val_queries=sum(len(i.consumers) for i in val),
                gallery=gallery_size,
                distractors=gallery_size - sum(len(i.shops) for i in val),
            )
        )
    train_pairs = sum(len(i.pairs) for members in kept.values() for i in members)
    return SplitSummary(seed=seed, train_pairs=train_pairs, categories=tuple(rows))


def training_identities(layout: DataLayout, category: Category) -> list[Identity]:
    """The training identities of one category; an identity's class label is its index in this list."""
    if not layout.train_pairs.exists():
        raise FileNotFoundError(f"{layout.train_pairs} is missing: run `jdfashion data split` first")
    return [i for i in identities(read_pairs(layout.train_pairs)) if i.category == category]


def _identity(pairs: list[Pair]) -> Identity:
    consumers: dict[str, ImageRef] = {}
    shops: dict[str, ImageRef] = {}
    for pair in pairs:
        consumers.setdefault(pair.consumer.url, pair.consumer)
        shops.setdefault(pair.shop.url, pair.shop)
    return Identity(pairs[0].category, tuple(consumers.values()), tuple(shops.values()), tuple(pairs))


def _assign(
    members: list[Identity],
    val_fraction: float,
    distractor_fraction: float,
    seed: int,
    category: Category,
    val_pool: Callable[[Identity], bool] | None = None,
) -> tuple[list[Identity], list[Identity], list[Identity]]:
    """Shuffle one category's identities (seeded per category) into validation, distractor, train;
    with ``val_pool``, validation identities come first from the pool's shuffled members."""
    count = len(members)
    if count < 2:
        return [], [], list(members)
    rng = np.random.default_rng([seed, category.value])
    order = rng.permutation(count)
    pool_size = count
    if val_pool is not None:
        in_pool = np.array([val_pool(members[i]) for i in order], dtype=bool)
        order = np.concatenate([order[in_pool], order[~in_pool]])
        pool_size = int(in_pool.sum())
        if pool_size == 0:
            raise ValueError(f"{category.label}: no identity qualifies for validation (val_pool)")
    val_count = min(max(1, round(pool_size * val_fraction)), pool_size, count - 1)
    distractor_count = min(round(count * distractor_fraction), count - 1 - val_count)
    val_index = sorted(order[:val_count])
    distractor_index = sorted(order[val_count : val_count + distractor_count])
    train_index = sorted(order[val_count + distractor_count :])
    return tuple([members[i] for i in index] for index in (val_index, distractor_index, train_index))


def _write_validation(
    out: DataLayout,
    category: Category,
    val: list[Identity],
    distractor: list[Identity],
    extra_distractors: Sequence[ImageRef],
) -> int:
    """Write one category's q.txt / s.txt / gt.txt and return the gallery size.

    A category without validation identities gets no files, and stale ones from an earlier split
    are removed so they cannot be scored by mistake.
    """
    files = (out.val_queries(category), out.val_gallery(category), out.val_truth(category))
    if not val:
        for path in files:
            path.unlink(missing_ok=True)
        return 0
    gallery = {ref.url: ref for identity in (*val, *distractor) for ref in identity.shops}
    val_urls = {url for identity in val for url in identity.urls}
    for ref in extra_distractors:
        if ref.url not in val_urls:
            gallery.setdefault(ref.url, ref)
    queries_path, gallery_path, truth_path = files
    write_images(queries_path, [ref for identity in val for ref in identity.consumers])
    write_images(gallery_path, gallery.values())
    write_truth(truth_path, {q.url: [s.url for s in i.shops] for i in val for q in i.consumers})
    return len(gallery)
