"""CSV manifests and the Grocery Store protocol become official-layout lists that name images in place."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdfashion.data.images import load_image, url_to_path
from jdfashion.data.jdformat import Box, Category, FormatError, read_images, read_pairs, read_truth
from jdfashion.data.manifest import grocery_manifest, import_manifest

LISTS = {"p.txt", "q_all.txt", "s.txt", "gt.txt"}


def make_image(path: Path, width: int, height: int, orientation: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(width * height).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if orientation is None:
        image.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(path, exif=exif)
    return path


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, *rows])
    return path


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A small collection: two identities with photos and shop images, one extra shop image."""
    folder = tmp_path / "collection"
    for name, size in {"a1": (8, 6), "a2": (9, 7), "a_shop": (10, 12), "a_shop2": (5, 5)}.items():
        make_image(folder / "ident a" / f"{name}.png", *size)
    for name, size in {"b1": (6, 6), "b_shop": (7, 9), "c_shop": (4, 4)}.items():
        make_image(folder / f"{name}.png", *size)
    make_image(folder / "rotated.jpg", 16, 8, orientation=6)
    return folder


HEADER = ["path", "identity", "domain", "category", "x1", "y1", "x2", "y2", "role"]


def good_rows() -> list[list[object]]:
    return [
        ["ident a/a1.png", "A", "consumer", "bags", 1, 1, 5, 4, "test"],
        ["ident a/a_shop.png", "A", "shop", "1", "", "", "", "", "test"],
        ["ident a/a2.png", "A", "consumer", "bag", "", "", "", "", "test"],
        ["ident a/a_shop2.png", "A", "shop", "1", "", "", "", "", "test"],
        ["b1.png", "B", "consumer", "shoes", "", "", "", "", ""],
        ["rotated.jpg", "B", "consumer", "shoes", "", "", "", "", "train"],
        ["b_shop.png", "B", "shop", "2", "", "", "", "", "train"],
        ["b_shop.png", "B", "shop", "2", "", "", "", "", "distractor"],
        ["c_shop.png", "C", "shop", "0", "", "", "", "", "distractor"],
    ]


def test_import_writes_official_lists_that_point_at_the_originals(photos: Path, tmp_path: Path) -> None:
    manifest = write_csv(photos / "manifest.csv", HEADER, good_rows())
    out = tmp_path / "data"
    summary = import_manifest(manifest, out)

    assert {p.name for p in out.iterdir()} == LISTS
    url = {name: (photos / name).absolute().as_uri() for name in os.listdir(photos)}
    url |= {name: (photos / "ident a" / name).absolute().as_uri() for name in os.listdir(photos / "ident a")}
    pairs = read_pairs(out / "p.txt")
    assert [(p.consumer.url, p.shop.url, p.category) for p in pairs] == [
        (url["b1.png"], url["b_shop.png"], Category.SHOES),
        (url["rotated.jpg"], url["b_shop.png"], Category.SHOES),
    ]
    assert [p.consumer.box for p in pairs] == [Box(0, 0, 6, 6), Box(0, 0, 8, 16)]  # EXIF 6: shown upright
    queries = read_images(out / "q_all.txt")
    assert [(q.url, q.box) for q in queries] == [
        (url["a1.png"], Box(1, 1, 5, 4)),
        (url["a2.png"], Box(0, 0, 9, 7)),
    ]
    gallery = [ref.url for ref in read_images(out / "s.txt")]
    assert gallery == [url["a_shop.png"], url["a_shop2.png"], url["b_shop.png"], url["c_shop.png"]]
    matches = [url["a_shop.png"], url["a_shop2.png"]]
    assert read_truth(out / "gt.txt") == {url["a1.png"]: matches, url["a2.png"]: matches}
    assert (summary.train_identities, summary.train_pairs, summary.test_identities) == (1, 2, 1)
    assert (summary.queries, summary.gallery, summary.distractors) == (2, 4, 2)
    assert url_to_path(queries[1].url, tmp_path / "unused") == photos / "ident a" / "a2.png"


def test_role_column_is_optional(photos: Path, tmp_path: Path) -> None:
    """Without ``role`` every row trains; paths may be relative to the CSV's folder or absolute."""
    rows = [
        ["collection/b1.png", "B", "consumer", "shoes"],
        [photos / "b_shop.png", "B", "shop", "shoes"],
        ["collection/c_shop.png", "B", "shop", "shoes"],
        ["collection/ident a/a_shop.png", "B", "consumer", "shoes"],
    ]
    summary = import_manifest(write_csv(tmp_path / "m.csv", HEADER[:4], rows), tmp_path / "out")
    assert (summary.train_identities, summary.train_pairs, summary.queries, summary.gallery) == (1, 3, 0, 0)
    url = {
        name: (photos / name).as_uri()
        for name in ("b1.png", "b_shop.png", "c_shop.png", "ident a/a_shop.png")
    }
    # Every photo with the first shop image; the first photo with each further one: nothing left out.
    assert [(p.consumer.url, p.shop.url) for p in read_pairs(tmp_path / "out" / "p.txt")] == [
        (url["b1.png"], url["b_shop.png"]),
        (url["ident a/a_shop.png"], url["b_shop.png"]),
        (url["b1.png"], url["c_shop.png"]),
    ]
    assert read_images(tmp_path / "out" / "q_all.txt") == []
    assert read_truth(tmp_path / "out" / "gt.txt") == {}


def replace_row(index: int, **changes: object) -> list[list[object]]:
    rows = good_rows()
    for name, value in changes.items():
        rows[index][HEADER.index(name)] = value
    return rows


@pytest.mark.parametrize(
    ("header", "rows", "line", "field"),
    [
        pytest.param(HEADER[1:], [], 1, "header", id="no-path-column"),
        pytest.param([*HEADER, "colour"], [], 1, "header", id="unknown-column"),
        pytest.param([*HEADER[:5], "role"], [], 1, "header", id="partial-box-columns"),
        pytest.param(HEADER, [*good_rows()[:2], good_rows()[2][:-1]], 4, "field count", id="short-row"),
        pytest.param(HEADER, replace_row(2, path="ident a/missing.png"), 4, "path", id="missing-file"),
        pytest.param(HEADER, replace_row(0, domain="street"), 2, "domain", id="bad-domain"),
        pytest.param(HEADER, replace_row(4, category="hats"), 6, "category", id="bad-category"),
        pytest.param(HEADER, replace_row(0, x2=""), 2, "x2", id="partial-box"),
        pytest.param(HEADER, replace_row(0, y2=1), 2, "y2", id="empty-box"),
        pytest.param(HEADER, replace_row(0, x1="1.5"), 2, "x1", id="fractional-box"),
        pytest.param(HEADER, replace_row(5, role="holdout"), 7, "role", id="unknown-role"),
        pytest.param(HEADER, replace_row(4, role="test"), 7, "role", id="train-and-test-identity"),
        pytest.param(HEADER, replace_row(2, category="shoes"), 4, "category", id="identity-two-categories"),
        pytest.param(
            HEADER, replace_row(8, identity="A", category="1"), 10, "role", id="distractor-of-test-identity"
        ),
        pytest.param(HEADER, replace_row(8, domain="consumer"), 10, "role", id="consumer-distractor"),
        pytest.param(
            HEADER,
            replace_row(8, path="b1.png", domain="consumer", role="train"),
            10,
            "identity",
            id="image-in-two-identities",
        ),
        pytest.param(HEADER, replace_row(7, role="train"), 9, "path", id="repeated-row"),
        pytest.param(
            HEADER, [r for r in good_rows() if r[0] != "b_shop.png"], 6, "domain", id="train-without-shop"
        ),
        pytest.param(
            HEADER,
            [r for r in good_rows() if "shop" not in r[0] or r[1] != "A"],
            2,
            "domain",
            id="test-without-shop",
        ),
    ],
)
def test_bad_manifests_name_csv_line_and_field(
    photos: Path, tmp_path: Path, header, rows, line, field
) -> None:
    manifest = write_csv(photos / "manifest.csv", header, rows)
    with pytest.raises(FormatError) as caught:
        import_manifest(manifest, tmp_path / "out")
    assert str(caught.value).startswith(f"{manifest}:{line}: {field}: ")
    assert not (tmp_path / "out").exists()


GROCERY_HEADER = (
    "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
    "Iconic Image Path (str),Product Description Path (str)"
)


def make_grocery(root: Path) -> Path:
    """A miniature of the Grocery Store layout: classes.csv, iconic images, train/val/test lists."""
    dataset = root / "dataset"
    names = ["Apple", "Milk", "Juice"]
    lines = [GROCERY_HEADER]
    for class_id, name in enumerate(names):
        iconic = f"/iconic-images-and-descriptions/{name}/{name}_Iconic.jpg"
        make_image(dataset / iconic.lstrip("/"), 6 + class_id, 6)
        lines.append(f"{name},{class_id},{name},{class_id},{iconic},/{name}_Description.txt")
    (dataset / "classes.csv").write_text("\n".join(lines))
    for split, per_class in {"train": 2, "val": 1, "test": 1}.items():
        listed = []
        for class_id, name in enumerate(names):
            for index in range(per_class):
                relative = f"{split}/{name}/{name}_{index:03d}.jpg"
                make_image(dataset / relative, 5, 4 + index)
                listed.append(f"{relative}, {class_id}, {class_id}\n")
        (dataset / f"{split}.txt").write_text("".join(listed))
    return dataset


def test_grocery_protocol_on_a_miniature(tmp_path: Path) -> None:
    """Apple trains, Juice is tested, Milk (in neither) only lends its iconic image as a distractor."""
    dataset = make_grocery(tmp_path / "grocery")
    rows = grocery_manifest(dataset, tmp_path / "grocery.csv", train_ids=[0], test_ids=[2])
    summary = import_manifest(tmp_path / "grocery.csv", tmp_path / "out")
    # 4 photos each of Apple and Juice; iconic rows: Apple train + distractor, Milk distractor, Juice test.
    assert rows == 4 * 2 + 4
    assert (summary.train_pairs, summary.queries, summary.gallery, summary.distractors) == (4, 4, 3, 2)
    juice_iconic = (dataset / "iconic-images-and-descriptions/Juice/Juice_Iconic.jpg").as_uri()
    truth = read_truth(tmp_path / "out" / "gt.txt")
    assert len(truth) == 4 and all(matches == [juice_iconic] for matches in truth.values())
    assert all("/Juice/" in query for query in truth)
    with pytest.raises(ValueError, match="both train and test"):
        grocery_manifest(dataset, tmp_path / "bad.csv", train_ids=[0, 1], test_ids=[1])


@pytest.mark.realdata
def test_grocery_store_default_protocol(shared_data: Path, tmp_path: Path) -> None:
    dataset = shared_data / "grocery-store" / "dataset"
    if not dataset.is_dir():
        pytest.skip("grocery-store dataset not present")
    grocery_manifest(dataset, tmp_path / "grocery.csv")
    out = tmp_path / "out"
    summary = import_manifest(tmp_path / "grocery.csv", out)

    class_of_photo = {}
    for list_name in ("train.txt", "val.txt", "test.txt"):
        for line in (dataset / list_name).read_text().splitlines():
            path, fine, _ = (field.strip() for field in line.split(","))
            class_of_photo[(dataset / path).as_uri()] = int(fine)
    with open(dataset / "classes.csv", newline="") as handle:
        iconic = {int(r[1]): (dataset / r[4].lstrip("/")).as_uri() for r in list(csv.reader(handle))[1:]}

    assert {p.name for p in out.iterdir()} == LISTS  # lists only: images are read in place
    truth = read_truth(out / "gt.txt")
    assert len(truth) == sum(43 <= c <= 58 for c in class_of_photo.values()) == summary.queries
    assert all(matches == [iconic[class_of_photo[query]]] for query, matches in truth.items())
    gallery = read_images(out / "s.txt")
    assert {ref.url for ref in gallery} == set(iconic.values()) and len(gallery) == 81
    assert summary.distractors == 65
    pairs = read_pairs(out / "p.txt")
    assert {class_of_photo[p.consumer.url] for p in pairs} == set(range(28)) | set(range(28, 43)) | set(
        range(59, 81)
    )
    assert all(p.shop.url == iconic[class_of_photo[p.consumer.url]] for p in pairs)
    first = pairs[0].consumer
    image = load_image(url_to_path(first.url, out / "images"))
    assert image.size == (first.box.x2, first.box.y2)
