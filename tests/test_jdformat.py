"""The official list files: the real challenge files parse and round-trip; malformed lines are named."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from jdfashion.data.jdformat import (
    Box,
    Category,
    FormatError,
    ImageRef,
    Pair,
    read_images,
    read_pairs,
    read_truth,
    write_images,
    write_pairs,
    write_truth,
)

SHOP = "http://img.example.com/s/1.jpg"
USER = "http://img.example.com/u/1.jpg"


@pytest.mark.realdata
def test_official_lists_parse_with_their_documented_sizes(shared_data: Path) -> None:
    jd = shared_data / "jd-challenge"
    pairs = read_pairs(jd / "example" / "p.txt")
    # Sizes from jd-challenge/README.md: 20 pairs, 5 sample queries, 100 gallery images, 1000 test queries.
    assert len(pairs) == 20
    assert len(read_images(jd / "example" / "q.txt")) == 5
    assert len(read_images(jd / "example" / "s.txt")) == 100
    assert len(read_images(jd / "test" / "q_all.txt")) == 1000
    last_fields = [line.split()[-1] for line in (jd / "example" / "p.txt").read_text().splitlines()]
    assert Counter(int(pair.category) for pair in pairs) == Counter(int(field) for field in last_fields)
    assert {pair.category for pair in pairs} == set(Category)


@pytest.mark.realdata
def test_q_all_round_trips_byte_exactly(shared_data: Path, tmp_path: Path) -> None:
    original = (shared_data / "jd-challenge" / "test" / "q_all.txt").read_bytes()
    assert original.endswith(b"\r\n") and original.count(b"\n") == original.count(b"\r\n") == 1000
    write_images(tmp_path / "q_all.txt", read_images(shared_data / "jd-challenge" / "test" / "q_all.txt"))
    assert (tmp_path / "q_all.txt").read_bytes() == original


@pytest.mark.realdata
def test_files_without_final_newline_gain_one_crlf(shared_data: Path, tmp_path: Path) -> None:
    example = shared_data / "jd-challenge" / "example"
    write_pairs(tmp_path / "p.txt", read_pairs(example / "p.txt"))
    assert (tmp_path / "p.txt").read_bytes() == (example / "p.txt").read_bytes()
    original = (example / "q.txt").read_bytes()
    assert not original.endswith(b"\n")
    write_images(tmp_path / "q.txt", read_images(example / "q.txt"))
    assert (tmp_path / "q.txt").read_bytes() == original + b"\r\n"


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda text: text.replace("\n", "\r\n").encode(), id="crlf"),
        pytest.param(lambda text: text.encode(), id="lf"),
        pytest.param(lambda text: text.rstrip("\n").encode(), id="no-final-newline"),
        pytest.param(lambda text: b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode(), id="bom"),
        pytest.param(lambda text: ("\n  \n" + text.replace("\n", "\n\n")).encode(), id="blank-lines"),
    ],
)
def test_readers_accept_line_end_variants(tmp_path: Path, encode) -> None:
    path = tmp_path / "s.txt"
    path.write_bytes(encode(f"{SHOP} 1 2 30 40\nfile:///data/b.jpg 0 0 5 5\n"))
    assert read_images(path) == [
        ImageRef(SHOP, Box(1, 2, 30, 40)),
        ImageRef("file:///data/b.jpg", Box(0, 0, 5, 5)),
    ]


def test_writers_round_trip_with_crlf(tmp_path: Path) -> None:
    pairs = [
        Pair(ImageRef(USER, Box(1, 2, 3, 4)), ImageRef(SHOP, Box(5, 6, 70, 80)), Category.SHOES),
        Pair(ImageRef(USER, Box(9, 9, 19, 19)), ImageRef(SHOP + "?v=2", Box(0, 0, 1, 1)), Category.BAGS),
    ]
    write_pairs(tmp_path / "p.txt", pairs)
    assert read_pairs(tmp_path / "p.txt") == pairs
    truth = {"q/b.jpg": ["s/2.jpg", "s/1.jpg"], "q/a.jpg": ["s/3.jpg"]}
    write_truth(tmp_path / "gt.txt", truth)
    assert list(read_truth(tmp_path / "gt.txt").items()) == list(truth.items())
    assert (tmp_path / "gt.txt").read_bytes() == b"q/b.jpg s/2.jpg s/1.jpg\r\nq/a.jpg s/3.jpg\r\n"


PAIR = f"{USER} 1 2 30 40 {SHOP} 5 6 70 80 0"
IMAGE = f"{SHOP} 1 2 30 40"


@pytest.mark.parametrize(
    ("reader", "text", "line", "field"),
    [
        pytest.param(read_images, f"{IMAGE}\n{IMAGE} 7\n", 2, "field count", id="image-extra-field"),
        pytest.param(read_images, f"{SHOP} 1.5 2 30 40\n", 1, "x1", id="non-integer-x1"),
        pytest.param(read_images, f"{SHOP} 1 -2 30 40\n", 1, "y1", id="negative-y1"),
        pytest.param(read_images, f"{SHOP} 30 2 30 40\n", 1, "x2", id="x2-equals-x1"),
        pytest.param(read_images, f"{SHOP} 1 50 30 40\n", 1, "y2", id="y2-above-y1"),
        pytest.param(read_images, f"{IMAGE}\r\n\r\n{IMAGE}\r\n", 3, "url", id="duplicate-id-after-blank"),
        pytest.param(read_images, "12 1 2 30 40\n", 1, "url", id="numeric-url"),
        pytest.param(read_images, "ftp://host/a.jpg 1 2 30 40\n", 1, "url", id="unknown-scheme"),
        pytest.param(
            read_images, b"\xef\xbb\xbf" + f"{IMAGE}\n\xff\n".encode("latin-1"), 2, "encoding", id="latin-1"
        ),
        pytest.param(read_pairs, f"{PAIR}\n{PAIR[:-1]}3\n", 2, "category", id="unknown-category"),
        pytest.param(read_pairs, f"{PAIR[:-1]}clothes\n", 1, "category", id="category-name"),
        pytest.param(read_pairs, PAIR.replace(" 80 0", " 8O 0"), 1, "shop_y2", id="letter-in-shop-y2"),
        pytest.param(read_pairs, PAIR.replace(" 30 40 ", " 1 40 ", 1), 1, "consumer_x2", id="consumer-x2"),
        pytest.param(read_pairs, PAIR.replace(f" {SHOP} ", " 77 "), 1, "shop_url", id="shifted-shop-url"),
        pytest.param(read_pairs, PAIR.rsplit(" ", 1)[0], 1, "field count", id="pair-missing-category"),
        pytest.param(read_truth, "q/a.jpg s/1.jpg\nq/a.jpg s/2.jpg\n", 2, "query_url", id="duplicate-query"),
        pytest.param(read_truth, "q/a.jpg s/1.jpg\n\nq/b.jpg\n", 3, "relevant_url", id="no-relevant"),
        pytest.param(read_truth, "q/a.jpg s/1.jpg s/1.jpg\n", 1, "relevant_url", id="relevant-twice"),
    ],
)
def test_malformed_lines_name_file_line_and_field(tmp_path: Path, reader, text, line, field) -> None:
    path = tmp_path / "list.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(FormatError) as caught:
        reader(path)
    assert str(caught.value).startswith(f"{path}:{line}: {field}: ")
    assert (caught.value.line, caught.value.field) == (line, field)


@pytest.mark.parametrize(
    ("write", "records", "line", "field"),
    [
        pytest.param(
            write_images,
            [ImageRef(SHOP, Box(0, 0, 1, 1)), ImageRef("http://h/a b.jpg", Box(0, 0, 1, 1))],
            2,
            "url",
            id="url-with-space",
        ),
        pytest.param(
            write_pairs,
            [Pair(ImageRef(USER, Box(0, 0, 1, 1)), ImageRef(SHOP, Box(4, 0, 2, 1)), Category.BAGS)],
            1,
            "shop_x2",
            id="inverted-shop-box",
        ),
        pytest.param(write_truth, {"q/a.jpg": []}, 1, "relevant_url", id="empty-relevant"),
    ],
)
def test_writers_refuse_what_readers_reject(tmp_path: Path, write, records, line, field) -> None:
    path = tmp_path / "out.txt"
    with pytest.raises(FormatError, match=rf"^{path}:{line}: {field}: "):
        write(path, records)
    assert list(tmp_path.iterdir()) == []
