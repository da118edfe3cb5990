"""The image store: where each image URL lives on disk, and how an item crop is read from it.

URL -> file (``url_to_path``), the one mapping ``fetch`` writes to and every reader reads from:

- ``http(s)://host[:port]/a/b.jpg`` -> ``image_root/host[_port]/a/b.jpg``. The path is used as written
  (no percent-decoding), so a URL maps to exactly one file and ``%2F``/``%2E%2E`` cannot climb out.
  A query string changes the image, so it is kept as a hash beside the stem:
  ``/a/b.jpg?w=1`` -> ``a/b_<first 12 hex of sha1("w=1")>.jpg``. A ``#fragment`` is ignored (never sent).
- ``file:///abs/x.jpg`` -> ``/abs/x.jpg``: local datasets are read in place, never copied. The path is
  percent-decoded, as ``Path.as_uri`` encodes it.
- a bare relative path ``a/b.jpg`` -> ``image_root/a/b.jpg``.

Boxes are in the displayed (EXIF-orientation-corrected) frame, the one an annotator saw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jdfashion.data.jdformat import Box, ImageRef

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
# What PIL raises while parsing a bad file; a decompression bomb is as unusable as a corrupt file.
_DECODE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)


class ImageDecodeError(OSError):
    """An image file that is missing, truncated or not an image; names the file (and URL when known)."""

    def __init__(self, path: str | Path, reason: str, url: str | None = None) -> None:
        self.path = str(path)
        self.reason = reason
        self.url = url
        where = f"{url} ({self.path})" if url else self.path
        super().__init__(f"{where}: cannot read image: {reason}")


class BoxError(ValueError):
    """An item box with no pixels inside its image (a box/image mismatch in the lists)."""

    def __init__(self, box: Box, size: tuple[int, int], url: str | None = None) -> None:
        self.box = box
        self.size = size
        self.url = url
        prefix = f"{url}: " if url else ""
        super().__init__(
            f"{prefix}box ({box.x1}, {box.y1}, {box.x2}, {box.y2}) has no pixels inside "
            f"the {size[0]}x{size[1]} image"
        )


def url_to_path(url: str, image_root: Path) -> Path:
    """The file an image id maps to (see the module docstring); ValueError naming ``url`` otherwise."""
    text = url.strip()
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        try:
            port = parts.port
        except ValueError as err:
            raise ValueError(f"{url!r}: bad port: {err}") from None
        if not parts.hostname:
            raise ValueError(f"{url!r}: no host")
        relative = _checked_relative(url, parts.path)
        if parts.query:
            digest = hashlib.sha1(parts.query.encode("utf-8")).hexdigest()[:12]
            relative = relative.with_name(f"{relative.stem}_{digest}{relative.suffix}")
        host = parts.hostname if port is None else f"{parts.hostname}_{port}"
        return image_root / host / relative
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{url!r}: file URL on another host {parts.netloc!r}")
        if not parts.path.startswith("/"):
            raise ValueError(f"{url!r}: file URL must hold an absolute path")
        local = unquote(parts.path)
        _checked_relative(url, local)
        return Path(local)
    if scheme:
        raise ValueError(f"{url!r}: unsupported scheme {scheme!r} (expected http, https or file)")
    if text.startswith("/"):
        raise ValueError(f"{url!r}: absolute path without a scheme; write it as a file:// URL")
    return image_root / _checked_relative(url, text)


def _checked_relative(url: str, path: str) -> PurePosixPath:
    """Refuse paths that name no file or could leave the image root."""
    components = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in components:
        raise ValueError(f"{url!r}: '..' path components are not allowed")
    if not components or path.endswith("/"):
        raise ValueError(f"{url!r}: no file name in the path")
    return PurePosixPath(*components)


def load_image(path: str | Path) -> Image.Image:
    """Fully decoded RGB image, upright as displayed.

    Decoding is forced here (PIL otherwise decodes lazily) so a truncated file fails at load time
    with the file's name rather than later inside a training batch.
    """
    try:
        with Image.open(path) as source:
            source.load()
            image = ImageOps.exif_transpose(source)
    except FileNotFoundError:
        raise ImageDecodeError(path, "file not found") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (unrecognised format)") from None
    except _DECODE_ERRORS as err:
        raise ImageDecodeError(path, str(err) or type(err).__name__) from err
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: str | Path) -> Image.Image:
    """Transparent pixels become white (shop images are shot on white); 16-bit samples keep their range."""
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        # PIL's own I;16 -> L conversion clips at 255, which turns a 16-bit photo white.
        samples = np.clip(np.asarray(image), 0, 65535) >> 8
        return Image.fromarray(samples.astype(np.uint8)).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError as err:
        raise ImageDecodeError(path, f"unsupported image mode {image.mode!r}: {err}") from err


def crop_to_box(image: Image.Image, box: Box) -> Image.Image:
    """The box's pixels, with the box clamped to the image (annotated boxes often overrun the edge)."""
    width, height = image.size
    left, right = max(0, box.x1), min(width, box.x2)
    top, bottom = max(0, box.y1), min(height, box.y2)
    if right <= left or bottom <= top:
        raise BoxError(box, image.size)
    return image.crop((left, top, right, bottom))


def load_item(ref: ImageRef, image_root: Path) -> np.ndarray:
    """The item crop of one list entry, HxWx3 uint8; every error names the URL."""
    path = url_to_path(ref.url, image_root)
    try:
        image = load_image(path)
    except ImageDecodeError as err:
        raise ImageDecodeError(path, err.reason, url=ref.url) from err
    try:
        crop = crop_to_box(image, ref.box)
    except BoxError as err:
        raise BoxError(ref.box, image.size, url=ref.url) from err
    return np.array(crop, dtype=np.uint8)
