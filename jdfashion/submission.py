"""The challenge's submission file: writing it, reading it, and saying everything wrong with one.

The organisers did not score a malformed file and allowed one submission a day, so a file is checked
completely before it leaves (every problem with its line, not just the first) and a writer never
replaces a good submission with a bad one.

Format (``test/sample_submission.txt``): lines starting with ``#`` are ignored; for each query, in
``q_all.txt`` order, the query url on its own line, then ten ``rank url`` lines, rank 1..10.
"""

from __future__ import annotations

import bisect
import codecs
import re
from collections.abc import Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

from jdfashion.atomic import atomic_write_text
from jdfashion.data.jdformat import FormatError, url_problem

TOP_K = 10  # results per query in a submission, and the k of rank-1 / mAP@10's lists: the one definition
FORMAT_COMMENT = (
    "# format: each query (in q.txt) followed by its top-10 results in the reference dataset (s.txt)."
    ' Lines starting with "#" will be ignored. See examples below:'
)
RESULTS_COMMENT = "# followed by top-10 results: [rank image_url]"
_PLACEHOLDER = re.compile(r"https?://x+/?", re.IGNORECASE)
_UNSAFE_IN_TEAM = re.compile(r"[\s/\\\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a submission; ``field`` names the part of the line at fault."""

    line: int
    message: str
    field: str = "line"

    def __str__(self) -> str:
        return f"line {self.line}: {self.field}: {self.message}"


class SubmissionError(ValueError):
    """``write_submission`` refused to write: the file it would have written is not a valid submission."""

    def __init__(self, path: Path, problems: Sequence[Problem]) -> None:
        self.path = path
        self.problems = list(problems)
        shown = "\n".join(f"  {problem}" for problem in self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"refusing to write {path}: {len(self.problems)} problem(s) in the submission it would hold:\n"
            f"{shown}{more}"
        )


@dataclass(frozen=True)
class _Result:
    line: int
    url: str


@dataclass
class _Block:
    """One query line and the rank lines under it."""

    query: str
    line: int
    repeated: bool = False
    results: list[_Result] = field(default_factory=list)


def submission_filename(team: str) -> str:
    """The attachment name the organisers asked for: ``Item_<team>.txt``."""
    if not team:
        raise ValueError("team name is empty: the submission file is named Item_<team>.txt")
    unsafe = _UNSAFE_IN_TEAM.search(team)
    if unsafe or team in {".", ".."}:
        what = repr(unsafe.group()) if unsafe else "a bare dot name"
        raise ValueError(
            f"team name {team!r} cannot be part of the file name Item_<team>.txt: it contains {what}"
            " (spaces, slashes, backslashes and control characters are not allowed)"
        )
    return f"Item_{team}.txt"


def render_submission(
    query_urls: Sequence[str], ranked: Mapping[str, Sequence[str]], header: str | None = None
) -> str:
    """The file text with ``\\n`` line ends, laid out as the official sample; queries absent from
    ``ranked`` are left out (the validator then reports them)."""
    lines = [FORMAT_COMMENT]
    if header:
        lines += [f"# {text}".rstrip() for text in header.splitlines()]
    for number, query in enumerate(query_urls, start=1):
        if query not in ranked:
            continue
        lines += [f"# query {number}", query, RESULTS_COMMENT]
        lines += [f"{rank} {url}" for rank, url in enumerate(ranked[query], start=1)]
    return "\n".join(lines) + "\n"


def write_submission(
    path: str | Path,
    query_urls: Sequence[str],
    ranked: Mapping[str, Sequence[str]],
    *,
    gallery: Collection[str] | None = None,
    header: str | None = None,
) -> Path:
    """Write the submission atomically with CRLF line ends, only if the exact text passes validation
    (every query, in order, ten unique urls each, all in ``gallery`` when given); otherwise raise
    ``SubmissionError`` and leave any earlier file untouched. ``header`` becomes ``#`` comment lines."""
    path = Path(path)
    if not query_urls:
        raise ValueError(f"refusing to write {path}: the query list is empty")
    text = render_submission(query_urls, ranked, header)
    problems = _find_problems(_split_lines(text), query_urls, gallery)
    if problems:
        raise SubmissionError(path, problems)
    atomic_write_text(path, text, newline="\r\n")
    return path


def read_submission(path: str | Path) -> dict[str, list[str]]:
    """Query url -> its ten result urls, in file order. Raises ``FormatError`` at the first line that
    breaks the format (the file alone decides; use ``validate_submission`` to check against q/s)."""
    lines, problems = _read_lines(Path(path))
    blocks, format_problems = _scan(lines)
    problems += format_problems
    if problems:
        first = min(problems, key=lambda problem: problem.line)
        raise FormatError(path, first.line, first.field, first.message)
    return {block.query: [result.url for result in block.results] for block in blocks}


def validate_submission(path: str | Path, queries: Sequence[str], gallery: Collection[str]) -> list[Problem]:
    """Every problem in the file, by line: format, ranks, placeholders, duplicates, urls outside the
    gallery, and queries missing, unknown, repeated or out of ``queries`` (q_all) order. Empty: valid."""
    lines, problems = _read_lines(Path(path))
    return sorted(problems + _find_problems(lines, queries, gallery), key=lambda problem: problem.line)


def _read_lines(path: Path) -> tuple[list[str], list[Problem]]:
    """The file's lines (CRLF or LF, a BOM tolerated); undecodable bytes are a problem, not a crash."""
    data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        return _split_lines(data.decode("utf-8")), []
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        problem = Problem(line, f"not UTF-8 text (byte {data[error.start]:#04x})", "encoding")
        return _split_lines(data.decode("utf-8", errors="replace")), [problem]


def _split_lines(text: str) -> list[str]:
    """Split at LF only, so line numbers match an editor's even if a url holds other break characters
    (``str.splitlines`` also breaks at form feeds and U+2028); a CR left at the end is stripped later."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


def _find_problems(
    lines: Sequence[str], queries: Sequence[str], gallery: Collection[str] | None
) -> list[Problem]:
    blocks, problems = _scan(lines)
    problems += _check_queries(blocks, queries, end_line=len(lines) + 1)
    if gallery is not None:
        problems += _check_gallery(blocks, gallery)
    return sorted(problems, key=lambda problem: problem.line)


def _scan(lines: Sequence[str]) -> tuple[list[_Block], list[Problem]]:
    """Read the structure and check what the file alone can show: layout, ranks, placeholders,
    duplicate urls within a query, short lists, repeated queries."""
    blocks: list[_Block] = []
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) == 1 and not fields[0].isdigit():
            query = fields[0]
            repeated = query in first_seen
            if reason := url_problem(query):
                problems.append(Problem(number, reason, "query"))
            if repeated:
                problems.append(
                    Problem(number, f"{query} listed again (first at line {first_seen[query]})", "query")
                )
            first_seen.setdefault(query, number)
            blocks.append(_Block(query, number, repeated))
        elif len(fields) > 2:
            problems.append(
                Problem(number, f"expected a query url or 'rank url', found {len(fields)} fields", "line")
            )
        elif not blocks:
            problems.append(Problem(number, "rank line before any query line", "rank"))
        else:
            problems += _add_result(blocks[-1], number, fields)
    problems += _short_lists(blocks)
    return blocks, problems


def _add_result(block: _Block, number: int, fields: Sequence[str]) -> list[Problem]:
    expected = len(block.results) + 1
    if expected > TOP_K:
        return [Problem(number, f"more than {TOP_K} results for query {block.query}", "rank")]
    problems: list[Problem] = []
    rank_text, url = (fields[0], "") if len(fields) == 1 else fields
    try:
        rank = int(rank_text)
    except ValueError:
        problems.append(Problem(number, f"{rank_text!r} is not an integer (expected {expected})", "rank"))
    else:
        if rank != expected:
            problems.append(Problem(number, f"expected rank {expected}, found {rank}", "rank"))
    earlier_lines = [result.line for result in block.results if result.url == url]
    if reason := _result_url_problem(url):
        problems.append(Problem(number, reason, "url"))
    elif earlier_lines:
        problems.append(Problem(number, f"{url} repeats the result at line {earlier_lines[0]}", "url"))
    block.results.append(_Result(number, url))
    return problems


def _result_url_problem(url: str) -> str | None:
    if _PLACEHOLDER.fullmatch(url):
        return f"placeholder {url!r} instead of a gallery image url"
    return url_problem(url)


def _short_lists(blocks: Sequence[_Block]) -> list[Problem]:
    problems = []
    for position, block in enumerate(blocks):
        count = len(block.results)
        if count < TOP_K:
            where = "the file ends after" if position == len(blocks) - 1 else "only"
            problems.append(
                Problem(block.line, f"{where} {count} of {TOP_K} results for query {block.query}", "query")
            )
    return problems


def _check_queries(blocks: Sequence[_Block], queries: Sequence[str], end_line: int) -> list[Problem]:
    """Unknown queries, queries out of q_all order (the fewest that break the order: those outside the
    longest in-order run), and missing queries, each placed at the line where it belongs."""
    index_of = {query: index for index, query in enumerate(queries)}
    problems = []
    known = []
    for block in blocks:
        if block.repeated:
            continue
        if block.query in index_of:
            known.append(block)
        else:
            problems.append(Problem(block.line, f"{block.query} is not in the query list", "query"))
    in_order = _longest_increasing([index_of[block.query] for block in known])
    for position, block in enumerate(known):
        if position not in in_order:
            problems.append(
                Problem(
                    block.line,
                    f"out of query-list order: {block.query} is query #{index_of[block.query] + 1}"
                    f" in the list but query #{position + 1} here",
                    "query",
                )
            )
    ordered_indices = [index_of[known[position].query] for position in sorted(in_order)]
    ordered_lines = [known[position].line for position in sorted(in_order)]
    present = {block.query for block in known}
    for index, query in enumerate(queries):
        if query in present:
            continue
        after = bisect.bisect_left(ordered_indices, index)
        line = ordered_lines[after] if after < len(ordered_lines) else end_line
        where = f"before line {line}" if after < len(ordered_lines) else "at the end"
        problems.append(Problem(line, f"query #{index + 1} {query} is missing (it belongs {where})", "query"))
    return problems


def _longest_increasing(values: Sequence[int]) -> set[int]:
    """Positions of one longest strictly increasing subsequence (patience sorting, O(n log n))."""
    tails: list[int] = []
    tail_positions: list[int] = []
    previous = [-1] * len(values)
    for position, value in enumerate(values):
        slot = bisect.bisect_left(tails, value)
        if slot:
            previous[position] = tail_positions[slot - 1]
        if slot == len(tails):
            tails.append(value)
            tail_positions.append(position)
        else:
            tails[slot] = value
            tail_positions[slot] = position
    chosen = set()
    position = tail_positions[-1] if tail_positions else -1
    while position >= 0:
        chosen.add(position)
        position = previous[position]
    return chosen


def _check_gallery(blocks: Sequence[_Block], gallery: Collection[str]) -> list[Problem]:
    lookup = gallery if isinstance(gallery, AbstractSet | Mapping) else set(gallery)
    return [
        Problem(result.line, f"{result.url} is not in the gallery", "url")
        for block in blocks
        for result in block.results
        if _result_url_problem(result.url) is None and result.url not in lookup
    ]
