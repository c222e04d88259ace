"""Turn a request's `image_url` into a decoded image, safely.

* `data:` URLs (base64) are the normal way in; their size is checked before the base64 is decoded, and the
  pixel count is checked on the image header before the pixels are (decompression-bomb guard).
* Remote URLs (`http:`, `https:`, any `scheme://`) are refused: the server never fetches on a client's behalf.
* Local paths are refused unless the server names a folder (`--allow-local-dir`); then only relative paths
  inside it are read: no absolute paths, no `..`, no symbolic links.
* URL schemes are matched case-insensitively (`DATA:` is a data URL, not a file name); a URL holding NUL or
  a lone surrogate is refused before it reaches the file system.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from pallava.processing.loading import CorruptImageError, ImageTooLargeError, load_image
from pallava.serve.protocol import APIError, unicode_problem

IMAGE_TYPES = frozenset(
    {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp", "image/tiff"}
)
_DATA_URL = re.compile(
    r"data:(?P<type>[^;,]*)(?P<params>(?:;[^;,]*)*),(?P<data>.*)", re.DOTALL | re.IGNORECASE
)
_REMOTE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")


def load_request_image(
    url: str,
    param: str,
    max_bytes: int,
    max_pixels: int,
    local_dir: Path | None = None,
) -> Image.Image:
    """Decode one `image_url` under the server's limits; any refusal is an `APIError` naming `param`."""
    problem = "it holds a NUL character" if "\0" in url else unicode_problem(url)
    if problem:
        raise APIError(400, f"{param}: invalid image URL: {problem}", param=param, code="invalid_image_url")
    scheme = url[:5].lower()
    if scheme == "data:":
        data = _decode_data_url(url, param, max_bytes)
        source: bytes | Path = data
    elif _REMOTE.match(url) and scheme != "file:":
        raise APIError(
            400,
            f"{param}: remote image URLs are refused (the server does not fetch URLs); "
            "send the image inline as a base64 data: URL",
            param=param,
            code="remote_url_refused",
        )
    else:
        source = _local_path(url, param, max_bytes, local_dir)
    try:
        return load_image(source, max_pixels)
    except ImageTooLargeError as error:
        raise APIError(400, f"{param}: {error}", param=param, code="image_too_large") from error
    except CorruptImageError as error:
        raise APIError(
            400, f"{param}: not a decodable image ({error})", param=param, code="invalid_image"
        ) from error


def _decode_data_url(url: str, param: str, max_bytes: int) -> bytes:
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise APIError(400, f"{param}: malformed data: URL (no comma)", param=param, code="invalid_image_url")
    media_type = match["type"].strip().lower()
    if media_type not in IMAGE_TYPES:
        raise APIError(
            400,
            f"{param}: unsupported media type {media_type or '(none)'!r}; expected one of "
            f"{', '.join(sorted(IMAGE_TYPES))}",
            param=param,
            code="unsupported_media_type",
        )
    if "base64" not in [p.strip().lower() for p in match["params"].split(";")]:
        raise APIError(
            400, f"{param}: data: URL must be base64-encoded", param=param, code="invalid_image_url"
        )
    payload = match["data"]
    if len(payload) * 3 // 4 > max_bytes:  # decoded size, known before decoding
        raise APIError(
            400,
            f"{param}: image is about {len(payload) * 3 // 4:,} bytes, over the limit of {max_bytes:,}",
            param=param,
            code="image_too_large",
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as error:
        raise APIError(
            400, f"{param}: invalid base64 ({error})", param=param, code="invalid_image_url"
        ) from error


def _local_path(url: str, param: str, max_bytes: int, local_dir: Path | None) -> Path:
    if local_dir is None:
        raise APIError(
            400,
            f"{param}: local image paths are disabled on this server; send a base64 data: URL",
            param=param,
            code="local_path_refused",
        )
    text = url[5:] if url[:5].lower() == "file:" else url
    refuse = None
    if not text:
        refuse = "empty path"
    elif (
        PurePosixPath(text).is_absolute()
        or PureWindowsPath(text).is_absolute()
        or PureWindowsPath(text).drive
    ):
        refuse = "absolute paths are refused; give a path relative to the allowed folder"
    elif ".." in PurePosixPath(text.replace("\\", "/")).parts:
        refuse = "'..' is refused in image paths"
    if refuse:
        raise APIError(400, f"{param}: {refuse}", param=param, code="local_path_refused")
    root = local_dir.resolve()
    candidate = Path(os.path.normpath(root / text))
    try:
        resolved = candidate.resolve(strict=True)
    except (RuntimeError, OSError, ValueError):  # missing, a loop, or a name the file system refuses
        raise APIError(
            400, f"{param}: no such image in the allowed folder: {text}", param=param, code="image_not_found"
        ) from None
    if resolved != candidate or not resolved.is_relative_to(root):
        raise APIError(
            400, f"{param}: symbolic links are not followed: {text}", param=param, code="local_path_refused"
        )
    if not resolved.is_file():
        raise APIError(400, f"{param}: not a file: {text}", param=param, code="image_not_found")
    if resolved.stat().st_size > max_bytes:
        raise APIError(
            400,
            f"{param}: {text} is over the limit of {max_bytes:,} bytes",
            param=param,
            code="image_too_large",
        )
    return resolved


def to_data_url(source: str | Path | bytes) -> str:
    """An image file or its bytes as a base64 `data:` URL, the form the API accepts (for clients)."""
    data = Path(source).read_bytes() if isinstance(source, (str, Path)) else bytes(source)
    try:
        with Image.open(io.BytesIO(data)) as image:
            media_type = Image.MIME.get(image.format or "", "application/octet-stream")
    except (OSError, SyntaxError) as error:
        raise CorruptImageError(f"cannot identify image {_name(source)}: {error}") from error
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def _name(source: str | Path | bytes) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)
