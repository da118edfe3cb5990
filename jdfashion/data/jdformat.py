"""The official JD challenge list files (p.txt, q.txt / q_all.txt, s.txt) and the local ground truth.

Records keep file order; every parse error names the file, the line number and the field.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from jdfashion.atomic import atomic_write_text


class Category(IntEnum):
    """The challenge's item categories, numbered as in p.txt's last field."""

    CLOTHES = 0
    BAGS = 1
    SHOES = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str | int) -> Category:
        """Accept ``0``/``"0"``/``"clothes"``/``"top"``-style names; raise ValueError otherwise."""
        aliases = {"top": cls.CLOTHES, "tops": cls.CLOTHES, "bag": cls.BAGS, "shoe": cls.SHOES}
        text = str(value).strip().lower()
        if text.isdigit() and int(text) in cls._value2member_map_:
            return cls(int(text))
        if text in aliases:
            return aliases[text]
        for member in cls:
            if member.label == text:
                return member
        raise ValueError(f"unknown category {value!r} (expected 0/1/2 or clothes/bags/shoes)")


@dataclass(frozen=True)
class Box:
    """Item box in pixels, column-first as in the official files: (x1, y1) top-left, (x2, y2) bottom-right."""

    x1: int
    y1: int
    x2: int
    y2: int


@dataclass(frozen=True)
class ImageRef:
    """One image id (its URL) and the box of the item in it."""

    url: str
    box: Box


@dataclass(frozen=True)
class Pair:
    """One p.txt line: a consumer photo and the shop image of the same item."""

    consumer: ImageRef
    shop: ImageRef
    category: Category


class FormatError(ValueError):
    """A malformed line in a list file; the message always reads ``file:line: field: problem``."""

    def __init__(self, path: str | Path, line: int, field: str, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}:{line}: {field}: {problem}")


IMAGE_FIELDS = ("url", "x1", "y1", "x2", "y2")
PAIR_FIELDS = (
    *(f"consumer_{name}" for name in IMAGE_FIELDS),
    *(f"shop_{name}" for name in IMAGE_FIELDS),
    "category",
)
_COORDINATES = IMAGE_FIELDS[1:]
_CATEGORY_CODES = {str(member.value): member for member in Category}
_SCHEMES = ("http://", "https://", "file://")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot serve as an image id in a whitespace-separated list file, or None if it can.

    A bare number is refused because it almost always means the columns are shifted.
    """
    if not url:
        return "empty image id"
    if any(char.isspace() for char in url):
        return f"image id {url!r} contains whitespace"
    if _INTEGER.fullmatch(url):
        return f"{url!r} is a number, not an image id (URL or path); are the columns shifted?"
    if "://" in url and not url.startswith(_SCHEMES):
        return f"image id {url!r} has an unsupported scheme (expected http://, https:// or file://)"
    return None


def parse_box(texts: Sequence[str], path: str | Path, line: int, prefix: str = "") -> Box:
    """Parse ``x1 y1 x2 y2``; errors name ``prefix + field`` so p.txt can say ``shop_y2``."""
    values = []
    for name, text in zip(_COORDINATES, texts, strict=True):
        if not _INTEGER.fullmatch(text):
            raise FormatError(path, line, prefix + name, f"not an integer: {text!r}")
        values.append(int(text))
    return _checked_box(Box(*values), path, line, prefix)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file without its BOM; a bad byte is reported with its line number."""
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise FormatError(path, line, "encoding", f"not UTF-8 (byte {data[error.start]:#04x})") from None


def read_pairs(path: str | Path) -> list[Pair]:
    """Read p.txt (or split/train.txt).

    A url may repeat: one consumer photo can show several items, and one shop image can match
    several photos; identities are derived from that graph (see data.split).
    """
    pairs = []
    for line, text in _content_lines(path):
        fields = _fields(text, PAIR_FIELDS, path, line)
        consumer = ImageRef(fields[0], parse_box(fields[1:5], path, line, "consumer_"))
        shop = ImageRef(fields[5], parse_box(fields[6:10], path, line, "shop_"))
        pairs.append(_checked_pair(Pair(consumer, shop, _category(fields[10], path, line)), path, line))
    return pairs


def write_pairs(path: str | Path, pairs: Iterable[Pair]) -> None:
    """Checked like read_pairs first (errors name ``path`` and the line it would be), so every list
    file the toolkit writes can be read back."""
    pairs = list(pairs)
    for line, pair in enumerate(pairs, start=1):
        _checked_pair(pair, path, line)
    _write_lines(path, [f"{_format_ref(p.consumer)} {_format_ref(p.shop)} {p.category.value}" for p in pairs])


def read_images(path: str | Path) -> list[ImageRef]:
    """Read q.txt, q_all.txt or s.txt: each url (the image id) must be unique."""
    numbered = []
    for line, text in _content_lines(path):
        fields = _fields(text, IMAGE_FIELDS, path, line)
        numbered.append((line, ImageRef(fields[0], parse_box(fields[1:], path, line))))
    return _checked_images(numbered, path)


def write_images(path: str | Path, refs: Iterable[ImageRef]) -> None:
    refs = _checked_images(list(enumerate(refs, start=1)), path)
    _write_lines(path, [_format_ref(ref) for ref in refs])


def read_truth(path: str | Path) -> dict[str, list[str]]:
    """Read a ground truth file: ``query_url relevant_url [relevant_url ...]`` per line."""
    numbered = []
    for line, text in _content_lines(path):
        query, *relevant = text.split()
        numbered.append((line, query, relevant))
    return _checked_truth(numbered, path)


def write_truth(path: str | Path, truth: Mapping[str, Sequence[str]]) -> None:
    numbered = [(line, query, list(relevant)) for line, (query, relevant) in enumerate(truth.items(), 1)]
    checked = _checked_truth(numbered, path)
    _write_lines(path, [" ".join([query, *relevant]) for query, relevant in checked.items()])


def _content_lines(path: str | Path) -> list[tuple[int, str]]:
    """Non-blank lines with their physical 1-based numbers; CRLF, LF, a BOM or no final newline are fine."""
    # split("\n") rather than splitlines(): only newlines delimit physical lines in these files.
    numbered = enumerate((raw.removesuffix("\r") for raw in read_text(path).split("\n")), start=1)
    return [(line, raw) for line, raw in numbered if raw.strip()]


def _fields(text: str, names: Sequence[str], path: str | Path, line: int) -> list[str]:
    fields = text.split()
    if len(fields) != len(names):
        expected = f"expected {len(names)} fields ({' '.join(names)}), got {len(fields)}"
        raise FormatError(path, line, "field count", expected)
    return fields


def _category(text: str, path: str | Path, line: int) -> Category:
    if text not in _CATEGORY_CODES:
        raise FormatError(path, line, "category", f"unknown category {text!r} (expected 0, 1 or 2)")
    return _CATEGORY_CODES[text]


def _checked_url(url: str, path: str | Path, line: int, field: str) -> str:
    problem = url_problem(url)
    if problem is not None:
        raise FormatError(path, line, field, problem)
    return url


def _checked_box(box: Box, path: str | Path, line: int, prefix: str) -> Box:
    for name in _COORDINATES:
        if getattr(box, name) < 0:
            raise FormatError(path, line, prefix + name, f"negative coordinate {getattr(box, name)}")
    if box.x2 <= box.x1:
        raise FormatError(path, line, prefix + "x2", f"x2 ({box.x2}) must be greater than x1 ({box.x1})")
    if box.y2 <= box.y1:
        raise FormatError(path, line, prefix + "y2", f"y2 ({box.y2}) must be greater than y1 ({box.y1})")
    return box


def _checked_ref(ref: ImageRef, path: str | Path, line: int, prefix: str = "") -> ImageRef:
    _checked_url(ref.url, path, line, prefix + "url")
    _checked_box(ref.box, path, line, prefix)
    return ref


def _checked_pair(pair: Pair, path: str | Path, line: int) -> Pair:
    _checked_ref(pair.consumer, path, line, "consumer_")
    _checked_ref(pair.shop, path, line, "shop_")
    return pair


def _checked_images(numbered: Sequence[tuple[int, ImageRef]], path: str | Path) -> list[ImageRef]:
    first_line: dict[str, int] = {}
    for line, ref in numbered:
        _checked_ref(ref, path, line)
        first = first_line.setdefault(ref.url, line)
        if first != line:
            raise FormatError(path, line, "url", f"duplicate image id {ref.url!r} (first on line {first})")
    return [ref for _, ref in numbered]


def _checked_truth(numbered: Sequence[tuple[int, str, list[str]]], path: str | Path) -> dict[str, list[str]]:
    truth: dict[str, list[str]] = {}
    first_line: dict[str, int] = {}
    for line, query, relevant in numbered:
        _checked_url(query, path, line, "query_url")
        first = first_line.setdefault(query, line)
        if first != line:
            raise FormatError(path, line, "query_url", f"duplicate query {query!r} (first on line {first})")
        if not relevant:
            raise FormatError(path, line, "relevant_url", "missing: every query needs at least one match")
        for url in relevant:
            _checked_url(url, path, line, "relevant_url")
        if len(set(relevant)) != len(relevant):
            duplicate = next(url for url in relevant if relevant.count(url) > 1)
            raise FormatError(path, line, "relevant_url", f"{duplicate!r} listed twice")
        truth[query] = relevant
    return truth


def _format_ref(ref: ImageRef) -> str:
    box = ref.box
    return f"{ref.url} {box.x1} {box.y1} {box.x2} {box.y2}"


def _write_lines(path: str | Path, lines: Sequence[str]) -> None:
    """Every line CRLF-terminated, final one included, exactly as the official q_all.txt."""
    atomic_write_text(path, "".join(f"{line}\n" for line in lines), newline="\r\n")
