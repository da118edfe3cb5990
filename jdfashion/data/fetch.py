"""Downloading the listed images into the image store, resumably.

A run can be killed and restarted at any point: files are written atomically and only after they
decode, so whatever is on disk is a complete image, and a rerun skips it. Files that are present but
do not decode (written by another tool, or damaged since) are downloaded again.
"""

from __future__ import annotations

import http.client
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from urllib.error import HTTPError, URLError

from jdfashion.atomic import atomic_path, atomic_write_text
from jdfashion.data.images import ImageDecodeError, load_image, url_to_path
from jdfashion.data.jdformat import PAIR_FIELDS, ImageRef, read_images, read_pairs
from jdfashion.progress import make_progress

# Client errors other than these mean the image is gone; retrying would only load the server.
_TRANSIENT_CLIENT_STATUSES = frozenset({408, 429})
_HEADERS = {"User-Agent": "jdfashion-fetch/0.1 (+https://github.com/fashion-challenge)"}


class Outcome(Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"
    CORRUPT = "corrupt"


_LOST = (Outcome.FAILED, Outcome.CORRUPT)


@dataclass
class FetchReport:
    """Counts over distinct URLs. ``failures`` lists, in input order, every URL left without a usable
    file (``failed`` and ``corrupt`` ones) with the reason."""

    ok: int = 0
    skipped: int = 0
    failed: int = 0
    corrupt: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.ok + self.skipped + self.failed + self.corrupt


class _DownloadError(Exception):
    """A URL that gave no body: a permanent HTTP error, or transient errors on every attempt."""


def fetch(
    refs_or_urls: Iterable[ImageRef | str],
    image_root: Path,
    *,
    workers: int = 8,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: float = 30,
    progress: bool = True,
    failures_path: Path | None = None,
) -> FetchReport:
    """Download every distinct URL to ``url_to_path(url, image_root)``.

    Connection errors, timeouts, 5xx, 408 and 429 are retried ``retries`` times, waiting
    ``backoff * 2**k`` seconds before retry k; other HTTP errors (404) fail at once. ``timeout`` bounds
    each socket operation. A download that does not decode counts as ``corrupt`` and is not kept.
    Non-http(s) URLs (``file://``, relative paths) are only checked: skipped if readable, failed if not.
    With ``failures_path``, the failures are also written there as ``url<TAB>reason`` lines.
    """
    if workers < 1 or retries < 0 or backoff < 0 or timeout <= 0:
        raise ValueError(
            f"need workers >= 1, retries >= 0, backoff >= 0, timeout > 0; got workers={workers}, "
            f"retries={retries}, backoff={backoff}, timeout={timeout}"
        )
    urls = list(dict.fromkeys(item.url if isinstance(item, ImageRef) else item for item in refs_or_urls))
    results: dict[int, tuple[Outcome, str]] = {}
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fetch")
    try:
        with make_progress({"failed": "{failed} failed"}, disable=not progress) as bar:
            task = bar.add_task("fetch", total=len(urls), failed=0)
            futures = {
                executor.submit(_fetch_one, url, image_root, retries + 1, backoff, timeout): index
                for index, url in enumerate(urls)
            }
            failed = 0
            for future in as_completed(futures):
                outcome = future.result()
                results[futures[future]] = outcome
                failed += outcome[0] in _LOST
                bar.update(task, advance=1, failed=failed)
    finally:
        # Ctrl-C: drop the queue and let only the in-flight downloads finish (their writes are atomic).
        executor.shutdown(wait=True, cancel_futures=True)

    outcomes = [results[index] for index in range(len(urls))]
    counts = Counter(outcome for outcome, _ in outcomes)
    report = FetchReport(
        ok=counts[Outcome.OK],
        skipped=counts[Outcome.SKIPPED],
        failed=counts[Outcome.FAILED],
        corrupt=counts[Outcome.CORRUPT],
        failures=[
            (url, " ".join(reason.split()))
            for url, (outcome, reason) in zip(urls, outcomes, strict=True)
            if outcome in _LOST
        ],
    )
    if failures_path is not None:
        atomic_write_text(failures_path, "".join(f"{url}\t{reason}\n" for url, reason in report.failures))
    return report


def _fetch_one(
    url: str, image_root: Path, attempts: int, backoff: float, timeout: float
) -> tuple[Outcome, str]:
    try:
        path = url_to_path(url, image_root)
    except ValueError as err:
        return Outcome.FAILED, str(err)
    downloadable = url.strip().lower().startswith(("http://", "https://"))
    if path.exists() or not downloadable:
        try:
            load_image(path)
            return Outcome.SKIPPED, ""
        except ImageDecodeError as err:
            if not downloadable:
                return Outcome.FAILED, f"{err.reason} (not an http(s) URL, nothing to download)"
        path.unlink()
    try:
        data = _download(url, attempts, backoff, timeout)
    except _DownloadError as err:
        return Outcome.FAILED, str(err)
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
            load_image(tmp)
    except ImageDecodeError as err:
        return Outcome.CORRUPT, f"corrupt download ({len(data)} bytes): {err.reason}"
    except OSError as err:
        return Outcome.FAILED, f"cannot write {path}: {err}"
    return Outcome.OK, ""


def _download(url: str, attempts: int, backoff: float, timeout: float) -> bytes:
    reason = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(url, headers=_HEADERS)
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return reply.read()
        except HTTPError as err:
            err.close()
            reason = f"HTTP {err.code} {err.reason}"
            if err.code < 500 and err.code not in _TRANSIENT_CLIENT_STATUSES:
                raise _DownloadError(reason) from None
        except (OSError, http.client.HTTPException) as err:
            cause = err.reason if isinstance(err, URLError) else err
            reason = f"{type(cause).__name__}: {cause}"
    raise _DownloadError(f"{reason} (after {attempts} attempts)")


def urls_from_lists(paths: Sequence[Path]) -> list[str]:
    """Distinct image URLs of p.txt / q.txt / q_all.txt / s.txt files, in file order.

    A file whose first line has p.txt's field count is read as pairs (consumer, then shop URL per line).
    """
    urls: dict[str, None] = {}
    for path in paths:
        if _first_line_field_count(path) == len(PAIR_FIELDS):
            refs = [ref for pair in read_pairs(path) for ref in (pair.consumer, pair.shop)]
        else:
            refs = read_images(path)
        urls.update(dict.fromkeys(ref.url for ref in refs))
    return list(urls)


def _first_line_field_count(path: Path) -> int:
    with open(path, encoding="utf-8-sig", errors="replace") as handle:
        return next((len(line.split()) for line in handle if line.strip()), 0)
