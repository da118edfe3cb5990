"""Fetching against a real HTTP server on 127.0.0.1: retries, back-off, corrupt bodies, resume."""

from __future__ import annotations

import io
import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jdfashion.data.fetch import FetchReport, fetch, urls_from_lists
from jdfashion.data.images import load_image, url_to_path
from jdfashion.data.jdformat import Box, Category, FormatError, ImageRef, Pair, write_images, write_pairs

TIMEOUT = 1.0
COLOURS = {
    "/ok/0.jpg": (200, 30, 30),
    "/ok/1.jpg": (30, 200, 30),
    "/ok/2.png": (30, 30, 200),
    "/slow.jpg": (120, 120, 0),
    "/flaky.jpg": (0, 120, 120),
}


def _encoded(colour: tuple[int, int, int], suffix: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, "PNG" if suffix == ".png" else "JPEG", quality=95)
    return buffer.getvalue()


class _ImageServer(ThreadingHTTPServer):
    """Serves each scenario by path and counts the requests per path."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bodies = {path: _encoded(colour, Path(path).suffix) for path, colour in COLOURS.items()}
        jpeg = _encoded((90, 90, 90), ".jpg")
        self.bodies["/truncated.jpg"] = jpeg[: len(jpeg) // 2]
        self.bodies["/error-page.jpg"] = b"<html><body>rate limited</body></html>"
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.release = threading.Event()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _ImageServer

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.hits[self.path] += 1
            hit = self.server.hits[self.path]
        if self.path == "/slow.jpg" and hit == 1:
            self.server.release.wait(5 * TIMEOUT)  # the client gives up first and retries
        if self.path == "/always-503.jpg" or (self.path == "/flaky.jpg" and hit == 1):
            self.send_error(503)
            return
        body = self.server.bodies.get(self.path)
        if body is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:
            pass  # the client timed out on this request and hung up

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_ImageServer]:
    image_server = _ImageServer()
    thread = threading.Thread(target=image_server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield image_server
    image_server.release.set()
    image_server.shutdown()
    image_server.server_close()


def _fetch(urls: list[str | ImageRef], root: Path, **options: object) -> FetchReport:
    settings = {"workers": 4, "retries": 2, "backoff": 0.01, "timeout": TIMEOUT, "progress": False}
    return fetch(urls, root, **{**settings, **options})


def test_fetch_downloads_retries_rejects_and_resumes(server: _ImageServer, tmp_path: Path) -> None:
    root = tmp_path / "images"
    good = [server.url(path) for path in COLOURS]
    missing = [server.url("/gone/a.jpg"), server.url("/gone/b.jpg")]
    down = server.url("/always-503.jpg")
    corrupt = [server.url("/truncated.jpg"), server.url("/error-page.jpg")]
    requested: list[str | ImageRef] = [
        good[0],
        missing[0],
        corrupt[0],
        ImageRef(good[1], Box(0, 0, 5, 5)),
        down,
        good[2],
        good[3],
        missing[1],
        good[4],
        corrupt[1],
        good[0],  # repeated ids (as in p.txt) are fetched once
    ]
    failures_path = tmp_path / "failures.tsv"

    report = _fetch(requested, root, progress=True, failures_path=failures_path)

    assert (report.ok, report.skipped, report.failed, report.corrupt) == (5, 0, 3, 2)
    assert report.total == 10
    for url, path in zip(good, COLOURS, strict=True):
        pixels = np.asarray(load_image(url_to_path(url, root))).astype(int)
        assert np.abs(pixels - np.array(COLOURS[path])).max() <= 6, url
    # Only verified images are left on disk: no corrupt bodies, no temporary files.
    on_disk = {path for path in root.rglob("*") if path.is_file()}
    assert on_disk == {url_to_path(url, root) for url in good}

    assert server.hits["/gone/a.jpg"] == 1  # 404 is not retried
    assert server.hits["/always-503.jpg"] == 3  # 1 + retries
    assert server.hits["/slow.jpg"] == 2
    assert server.hits["/flaky.jpg"] == 2
    assert server.hits["/truncated.jpg"] == 1

    lines = [line.split("\t") for line in failures_path.read_text().splitlines()]
    assert [url for url, _ in lines] == [missing[0], corrupt[0], down, missing[1], corrupt[1]]
    assert [tuple(line) for line in lines] == report.failures
    reasons = dict(report.failures)
    assert "HTTP 404" in reasons[missing[0]]
    assert "HTTP 503" in reasons[down]
    assert "3 attempts" in reasons[down]
    assert reasons[corrupt[0]].startswith("corrupt")
    assert reasons[corrupt[1]].startswith("corrupt")
    assert ".tmp" not in reasons[corrupt[1]]  # reasons name no temporary file that no longer exists

    before = server.hits.copy()
    rerun = _fetch(requested, root, failures_path=failures_path)
    assert (rerun.ok, rerun.skipped, rerun.failed, rerun.corrupt) == (0, 5, 3, 2)
    for url in good:
        path = "/" + url.split("/", 3)[3]
        assert server.hits[path] == before[path], f"{url} was downloaded again"
    assert len(failures_path.read_text().splitlines()) == 5


def test_present_but_corrupt_files_are_downloaded_again(server: _ImageServer, tmp_path: Path) -> None:
    good = [server.url(path) for path in ("/ok/0.jpg", "/ok/1.jpg")]
    assert _fetch(good, tmp_path).ok == 2
    damaged = url_to_path(good[0], tmp_path)
    damaged.write_bytes(damaged.read_bytes()[:100])

    report = _fetch(good, tmp_path)

    assert (report.ok, report.skipped) == (1, 1)
    assert server.hits["/ok/0.jpg"] == 2
    assert server.hits["/ok/1.jpg"] == 1
    assert load_image(damaged).size == (24, 16)


def test_refused_connection_fails_after_retries(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{closed_port}/x.jpg"
    report = _fetch([url], tmp_path, retries=1)
    assert report.failed == 1
    assert "2 attempts" in report.failures[0][1]
    assert not url_to_path(url, tmp_path).exists()


def test_local_and_invalid_urls_are_checked_not_downloaded(tmp_path: Path) -> None:
    readable = tmp_path / "local.png"
    Image.new("RGB", (4, 4)).save(readable)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    urls = [readable.as_uri(), broken.as_uri(), "shop/absent.jpg", "http://host/a/../../x.jpg"]

    report = _fetch(urls, tmp_path / "images")

    assert (report.ok, report.skipped, report.failed, report.corrupt) == (0, 1, 3, 0)
    reasons = dict(report.failures)
    assert "nothing to download" in reasons[broken.as_uri()]
    assert "not found" in reasons["shop/absent.jpg"]
    assert "'..'" in reasons["http://host/a/../../x.jpg"]
    assert broken.read_bytes() == b"not an image"  # a dataset read in place is never touched


def test_fetch_rejects_nonsense_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="workers"):
        fetch([], tmp_path, workers=0)


def test_urls_from_lists_reads_pairs_and_image_lists(tmp_path: Path) -> None:
    def ref(name: str) -> ImageRef:
        return ImageRef(f"http://img.example/{name}.jpg", Box(1, 2, 30, 40))

    pairs = [
        Pair(ref("user1"), ref("shop1"), Category.CLOTHES),
        Pair(ref("user2"), ref("shop1"), Category.CLOTHES),
        Pair(ref("user3"), ref("shop3"), Category.SHOES),
    ]
    write_pairs(tmp_path / "p.txt", pairs)
    write_images(tmp_path / "q_all.txt", [ref("query1"), ref("user1")])
    write_images(tmp_path / "s.txt", [ref("shop3"), ref("gallery9")])
    (tmp_path / "empty.txt").write_text("\r\n")

    lists = [tmp_path / name for name in ("p.txt", "q_all.txt", "s.txt", "empty.txt")]
    expected_names = ["user1", "shop1", "user2", "user3", "shop3", "query1", "gallery9"]
    assert urls_from_lists(lists) == [ref(name).url for name in expected_names]


def test_urls_from_lists_names_the_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "s.txt"
    bad.write_text("http://img.example/a.jpg 1 2 3\n")
    with pytest.raises(FormatError, match=re.escape(f"{bad}:1:")):
        urls_from_lists([bad])
