"""Submission files: the official layout, atomic validated writes, a validator that finds every problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from jdfashion.data.jdformat import FormatError, read_images
from jdfashion.submission import (
    FORMAT_COMMENT,
    RESULTS_COMMENT,
    SubmissionError,
    read_submission,
    submission_filename,
    validate_submission,
    write_submission,
)

QUERIES = [f"http://q.example/{name}.jpg" for name in "abc"]
GALLERY = [f"http://s.example/{number:02d}.jpg" for number in range(40)]
PLACEHOLDER = "http://xxx"


def ranked_lists() -> dict[str, list[str]]:
    """Ten distinct gallery urls per query, a different window for each."""
    return {query: GALLERY[5 * index : 5 * index + 10] for index, query in enumerate(QUERIES)}


def block(query: str, urls: list[str], ranks: list[str] | None = None) -> list[str]:
    ranks = ranks or [str(rank) for rank in range(1, len(urls) + 1)]
    return [query, *(f"{rank} {url}" for rank, url in zip(ranks, urls, strict=True))]


def valid_lines() -> list[str]:
    lines = ["# a comment"]
    for query, urls in ranked_lists().items():
        lines += block(query, urls)
    return lines


def write_lines(path: Path, lines: list[str], newline: str = "\r\n") -> Path:
    path.write_bytes(newline.join(lines).encode() + newline.encode())
    return path


def problems_of(tmp_path: Path, lines: list[str]) -> list[tuple[int, str, str]]:
    found = validate_submission(write_lines(tmp_path / "run.txt", lines), QUERIES, GALLERY)
    return [(problem.line, problem.field, problem.message) for problem in found]


def test_written_file_has_official_layout_and_reads_back(tmp_path: Path) -> None:
    path = write_submission(
        tmp_path / "Item_t.txt", QUERIES, ranked_lists(), gallery=GALLERY, header="fusion: 4 models\nk=10"
    )
    raw = path.read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n"), "every line ends CRLF, as the official files"
    lines = raw.decode().split("\r\n")
    assert lines[0] == FORMAT_COMMENT
    assert lines[1:3] == ["# fusion: 4 models", "# k=10"]
    second = lines.index(QUERIES[1])
    assert lines[second - 1] == "# query 2"
    assert lines[second + 1] == RESULTS_COMMENT
    assert lines[second + 2] == f"1 {ranked_lists()[QUERIES[1]][0]}"
    assert read_submission(path) == ranked_lists()
    assert list(read_submission(path)) == QUERIES
    assert validate_submission(path, QUERIES, GALLERY) == []


def test_official_comment_lines_and_blank_lines_are_ignored_with_either_line_end(tmp_path: Path) -> None:
    lines = valid_lines()
    lines[1:1] = ["", "# query 1", "   "]
    lines.insert(-3, "")
    for newline in ("\r\n", "\n"):
        path = write_lines(tmp_path / "run.txt", lines, newline)
        assert validate_submission(path, QUERIES, GALLERY) == []
        assert read_submission(path) == ranked_lists()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda ranked: ranked[QUERIES[1]].pop(), "of 10 results"),
        (lambda ranked: ranked[QUERIES[1]].__setitem__(4, ranked[QUERIES[1]][0]), "repeats the result"),
        (lambda ranked: ranked[QUERIES[2]].__setitem__(9, "http://elsewhere/x.jpg"), "not in the gallery"),
        (lambda ranked: ranked.pop(QUERIES[0]), "is missing"),
        (lambda ranked: ranked[QUERIES[0]].__setitem__(3, PLACEHOLDER), "placeholder"),
    ],
)
def test_invalid_submission_never_replaces_a_good_one(tmp_path: Path, mutate, reason: str) -> None:
    target = write_submission(tmp_path / "Item_t.txt", QUERIES, ranked_lists(), gallery=GALLERY)
    before = target.read_bytes()
    ranked = ranked_lists()
    mutate(ranked)
    with pytest.raises(SubmissionError, match=reason) as caught:
        write_submission(target, QUERIES, ranked, gallery=GALLERY)
    assert str(target) in str(caught.value)
    assert target.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["Item_t.txt"], "no temporary file left behind"


def test_write_refuses_an_empty_query_list(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="query list is empty"):
        write_submission(tmp_path / "Item_t.txt", [], {})


def test_write_refuses_a_query_list_with_a_repeat(tmp_path: Path) -> None:
    ranked = ranked_lists()
    with pytest.raises(SubmissionError, match="listed again"):
        write_submission(tmp_path / "Item_t.txt", [*QUERIES, QUERIES[0]], ranked, gallery=GALLERY)


def _replace(lines: list[str], old: str, new: str) -> list[str]:
    index = lines.index(old)
    return [*lines[:index], *([new] if new else []), *lines[index + 1 :]]


A, B, C = QUERIES
A_RESULTS, B_RESULTS, C_RESULTS = ranked_lists().values()
# Line numbers of valid_lines(): 1 comment, A at 2 (results 3-12), B at 13 (14-23), C at 24 (25-34).
MALFORMED = {
    "placeholder": (
        _replace(valid_lines(), f"7 {A_RESULTS[6]}", f"7 {PLACEHOLDER}"),
        9,
        "url",
        "placeholder",
    ),
    "short list": (_replace(valid_lines(), f"10 {B_RESULTS[9]}", ""), 13, "query", "only 9 of 10"),
    "missing rank lines at EOF": (valid_lines()[:-4], 24, "query", "file ends after 6 of 10"),
    "rank out of order": (
        _replace(valid_lines(), f"2 {A_RESULTS[1]}", f"3 {A_RESULTS[1]}"),
        4,
        "rank",
        "expected rank 2, found 3",
    ),
    "rank zero": (_replace(valid_lines(), f"1 {C_RESULTS[0]}", f"0 {C_RESULTS[0]}"), 25, "rank", "found 0"),
    "non-integer rank": (
        _replace(valid_lines(), f"5 {B_RESULTS[4]}", f"five {B_RESULTS[4]}"),
        18,
        "rank",
        "not an integer",
    ),
    "unknown gallery id": (
        _replace(valid_lines(), f"10 {C_RESULTS[9]}", "10 http://s.example/unknown.jpg"),
        34,
        "url",
        "not in the gallery",
    ),
    "duplicate url within a query": (
        _replace(valid_lines(), f"9 {A_RESULTS[8]}", f"9 {A_RESULTS[2]}"),
        11,
        "url",
        "repeats the result at line 5",
    ),
    "extra unknown query": (
        [*valid_lines(), *block("http://q.example/extra.jpg", GALLERY[:10])],
        35,
        "query",
        "not in the query list",
    ),
    "query listed twice": ([*valid_lines(), *block(B, B_RESULTS)], 35, "query", "listed again"),
    "missing query": (
        ["# comment", *block(A, A_RESULTS), *block(C, C_RESULTS)],
        13,
        "query",
        f"query #2 {B} is missing",
    ),
    "missing query at the end": (
        ["# comment", *block(A, A_RESULTS), *block(B, B_RESULTS)],
        24,
        "query",
        f"query #3 {C} is missing (it belongs at the end)",
    ),
    "query order": (
        ["# c", *block(A, A_RESULTS), *block(C, C_RESULTS), *block(B, B_RESULTS)],
        13,
        "query",
        "is query #3 in the list but query #2 here",
    ),
    "rank line before any query": (
        ["# c", f"1 {A_RESULTS[0]}", *valid_lines()],
        2,
        "rank",
        "before any query",
    ),
    "too many fields": (
        _replace(valid_lines(), f"3 {A_RESULTS[2]}", f"3 {A_RESULTS[2]} 0.93"),
        5,
        "line",
        "found 3 fields",
    ),
    "eleventh result": (
        [*valid_lines(), f"11 {GALLERY[39]}"],
        35,
        "rank",
        "more than 10 results",
    ),
    "rank without url": (_replace(valid_lines(), f"4 {B_RESULTS[3]}", "4"), 17, "url", "empty image id"),
    "query with a box": (_replace(valid_lines(), C, f"{C} 1 2 3 4"), 24, "line", "found 5 fields"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_each_malformed_input_is_reported_at_its_line(tmp_path: Path, case: str) -> None:
    lines, line, field, reason = MALFORMED[case]
    found = problems_of(tmp_path, lines)
    assert any(
        (got_line, got_field) == (line, field) and reason in message for got_line, got_field, message in found
    ), found


def test_the_line_of_a_problem_is_the_same_with_lf_line_ends(tmp_path: Path) -> None:
    lines, line, _, _ = MALFORMED["duplicate url within a query"]
    path = write_lines(tmp_path / "lf.txt", lines, "\n")
    assert [problem.line for problem in validate_submission(path, QUERIES, GALLERY)] == [line]


def test_every_problem_is_listed_in_line_order(tmp_path: Path) -> None:
    lines = valid_lines()
    lines = _replace(lines, f"2 {A_RESULTS[1]}", f"2 {PLACEHOLDER}")
    lines = _replace(lines, f"6 {B_RESULTS[5]}", "6 http://s.example/nope.jpg")
    lines = _replace(lines, f"8 {C_RESULTS[7]}", f"8 {C_RESULTS[0]}")
    found = problems_of(tmp_path, lines)
    assert [line for line, _, _ in found] == [4, 19, 32]


def test_one_misplaced_query_is_the_only_one_flagged(tmp_path: Path) -> None:
    queries = [f"http://q.example/{number}.jpg" for number in range(8)]
    order = [0, 7, 1, 2, 3, 4, 5, 6]
    lines = [line for number in order for line in block(queries[number], GALLERY[:10])]
    found = validate_submission(write_lines(tmp_path / "run.txt", lines), queries, GALLERY)
    assert [(problem.line, problem.field) for problem in found] == [(12, "query")]
    assert "query #8 in the list but query #2 here" in found[0].message


def test_undecodable_bytes_are_a_problem_with_a_line(tmp_path: Path) -> None:
    lines = valid_lines()
    lines.insert(4, "# a note")
    path = write_lines(tmp_path / "run.txt", lines)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"# a note", b"# caf\xe9"))
    found = validate_submission(path, QUERIES, GALLERY)
    assert [(problem.line, problem.field) for problem in found] == [(5, "encoding")]


def test_read_raises_format_error_naming_file_line_and_field(tmp_path: Path) -> None:
    lines, line, field, reason = MALFORMED["non-integer rank"]
    path = write_lines(tmp_path / "run.txt", lines)
    with pytest.raises(FormatError, match=reason) as caught:
        read_submission(path)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), line, field)


def test_read_reports_the_earliest_problem(tmp_path: Path) -> None:
    lines = valid_lines()[:-1]
    lines = _replace(lines, f"3 {B_RESULTS[2]}", f"3 {PLACEHOLDER}")
    with pytest.raises(FormatError) as caught:
        read_submission(write_lines(tmp_path / "run.txt", lines))
    assert (caught.value.line, caught.value.field) == (16, "url")


def test_submission_filename_follows_the_organisers_rule() -> None:
    assert submission_filename("MGPA") == "Item_MGPA.txt"
    assert submission_filename("时尚队") == "Item_时尚队.txt"


@pytest.mark.parametrize(
    ("team", "shown"), [("my team", "' '"), ("a/b", "'/'"), ("a\\b", "'\\\\'"), ("", "empty"), ("..", "dot")]
)
def test_submission_filename_rejects_names_unfit_for_a_file(team: str, shown: str) -> None:
    with pytest.raises(ValueError, match="team name") as caught:
        submission_filename(team)
    assert shown in str(caught.value)


# The official files (../shared/data/jd-challenge), read as they were published.


def _query_urls(path: Path) -> list[str]:
    return [ref.url for ref in read_images(path)]


def _sample_blocks(path: Path) -> dict[str, list[str]]:
    """The sample's queries and their listed urls, placeholders included, read without the module."""
    blocks: dict[str, list[str]] = {}
    for text in path.read_text().splitlines():
        fields = text.split()
        if not fields or text.startswith("#"):
            continue
        if len(fields) == 1:
            current = blocks.setdefault(fields[0], [])
        else:
            current.append(fields[1])
    return blocks


def _filled_with_gallery_ids(sample: dict[str, list[str]], pool: list[str]) -> dict[str, list[str]]:
    """Each query's real urls kept, placeholders dropped, the list topped up to ten from ``pool``."""
    filled = {}
    for query, urls in sample.items():
        real = [url for url in urls if url != PLACEHOLDER]
        filled[query] = real + [url for url in pool if url not in real][: 10 - len(real)]
    return filled


@pytest.mark.realdata
def test_official_test_sample_is_rejected_against_q_all(shared_data: Path, tmp_path: Path) -> None:
    challenge = shared_data / "jd-challenge"
    sample = challenge / "test" / "sample_submission.txt"
    queries = _query_urls(challenge / "test" / "q_all.txt")
    listed = _sample_blocks(sample)
    gallery = {url for urls in listed.values() for url in urls} - {PLACEHOLDER}
    found = validate_submission(sample, queries, gallery)
    missing = [problem for problem in found if "is missing" in problem.message]
    assert len(missing) == len(queries) - len(listed) == 995
    assert found == missing, "the sample's five query blocks are themselves well formed"
    end_of_file = len(sample.read_text().splitlines()) + 1
    assert {problem.line for problem in missing} == {end_of_file}
    assert f"query #6 {queries[5]} is missing" in missing[0].message


@pytest.mark.realdata
def test_official_test_sample_is_accepted_once_rewritten_with_gallery_ids(
    shared_data: Path, tmp_path: Path
) -> None:
    challenge = shared_data / "jd-challenge"
    listed = _sample_blocks(challenge / "test" / "sample_submission.txt")
    pool = _query_urls(challenge / "example" / "s.txt")
    gallery = set(pool) | {url for urls in listed.values() for url in urls} - {PLACEHOLDER}
    queries = list(listed)
    rewritten = write_submission(
        tmp_path / submission_filename("check"),
        queries,
        _filled_with_gallery_ids(listed, pool),
        gallery=gallery,
    )
    assert validate_submission(rewritten, queries, gallery) == []
    assert list(read_submission(rewritten)) == queries


@pytest.mark.realdata
def test_official_example_sample_is_rejected_then_accepted_when_filled(
    shared_data: Path, tmp_path: Path
) -> None:
    example = shared_data / "jd-challenge" / "example"
    sample = example / "sample_submission.txt"
    queries = _query_urls(example / "q.txt")
    gallery = _query_urls(example / "s.txt")
    found = validate_submission(sample, queries, gallery)
    placeholder_lines = [
        number for number, text in enumerate(sample.read_text().splitlines(), start=1) if PLACEHOLDER in text
    ]
    assert [problem.line for problem in found if "placeholder" in problem.message] == placeholder_lines
    missing = [problem.message for problem in found if "is missing" in problem.message]
    assert missing == [
        f"query #{number} {queries[number - 1]} is missing (it belongs at the end)" for number in (3, 4, 5)
    ]
    assert len(found) == len(placeholder_lines) + len(missing)
    with pytest.raises(FormatError, match="placeholder"):
        read_submission(sample)

    listed = _sample_blocks(sample)
    filled = write_submission(
        tmp_path / "Item_x.txt", list(listed), _filled_with_gallery_ids(listed, gallery), gallery=gallery
    )
    assert validate_submission(filled, list(listed), gallery) == []
