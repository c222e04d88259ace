"""Reading images safely: any source as RGB within a pixel limit, a header check for whole datasets, and
stain-normalised reading that normalises each file once.

Every model input goes through `load_image`: paths, bytes, PIL images, arrays and tensors, with the pixel
limit checked on the header before anything is decoded (a decompression bomb costs nothing) and clear
errors (`CorruptImageError`, `ImageTooLargeError`) that name the input.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pallava.processing.stain_norm import stain_normalize

DEFAULT_MAX_PIXELS = 16_777_216  # the paper's limit: 4096 x 4096

ImageSource = str | Path | bytes | Image.Image | np.ndarray | torch.Tensor


class CorruptImageError(ValueError):
    """The input could not be decoded as an image."""


class ImageTooLargeError(ValueError):
    """The image has more pixels than allowed (decompression-bomb guard)."""


def _describe(src: ImageSource) -> str:
    if isinstance(src, (str, Path)):
        return str(src)
    if isinstance(src, bytes):
        return f"<{len(src)} bytes>"
    if isinstance(src, (np.ndarray, torch.Tensor)):
        return f"<{type(src).__name__} {tuple(src.shape)} {src.dtype}>"
    return f"<{type(src).__name__}>"


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """A torch image as a numpy (H, W[, C]) array; (C, H, W) tensors (torch's layout) are moved
    channels-last."""
    tensor = tensor.detach().cpu()
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4) and tensor.shape[2] not in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16
    return tensor.numpy()


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """uint8 pixels as they are; floats must be finite and in [0, 1] (scaled by 255, rounded); other
    integers are clipped to 0-255. A float image in 0-255 would otherwise turn almost black or white."""
    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        raise CorruptImageError(f"image array {name} is empty")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise CorruptImageError(f"image array {name} holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1:
            raise CorruptImageError(
                f"image array {name} has values from {low:g} to {high:g}; expected floats in [0, 1] "
                "(or uint8 in 0-255)"
            )
        return np.rint(array.astype(np.float32) * 255.0).astype(np.uint8)
    return np.clip(array, 0, 255).astype(np.uint8)


def _over_limit(width: int, height: int, max_pixels: int | None) -> str | None:
    """How a size breaks the pixel limit, or None."""
    if max_pixels is not None and width * height > max_pixels:
        return f"{width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
    return None


def _check_pixels(width: int, height: int, max_pixels: int | None, name: str) -> None:
    if reason := _over_limit(width, height, max_pixels):
        raise ImageTooLargeError(f"image {name} is {reason}")


def load_image(src: ImageSource, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image from a path, bytes, PIL image, HxW[xC] array or tensor (also CxHxW) as RGB.

    The pixel limit is checked on the header, before the pixels are decoded, so an oversized
    (or decompression-bomb) file costs nothing. Undecodable input raises `CorruptImageError`.
    Arrays and tensors are uint8 in 0-255 or floats in [0, 1]; other float ranges are refused.
    """
    name = _describe(src)
    if isinstance(src, torch.Tensor):
        src = _tensor_to_array(src)
    if isinstance(src, Image.Image):
        _check_pixels(*src.size, max_pixels, name)
        return src if src.mode == "RGB" else src.convert("RGB")
    if isinstance(src, np.ndarray):
        if src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise CorruptImageError(f"image array {name} has shape {src.shape}; expected HxW, HxWx3 or HxWx4")
        _check_pixels(src.shape[1], src.shape[0], max_pixels, name)
        array = _to_uint8(src, name)
        return Image.fromarray(
            array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array
        ).convert("RGB")
    if isinstance(src, (str, Path)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        stream: io.IOBase = path.open("rb")
    elif isinstance(src, (bytes, bytearray)):
        stream = io.BytesIO(src)
    else:
        raise TypeError(
            f"unsupported image source {type(src).__name__}; expected a path, bytes, PIL image, array or "
            "tensor"
        )
    with stream:
        try:
            with Image.open(stream) as image:  # reads the header only
                _check_pixels(*image.size, max_pixels, name)
                image.seek(0)  # first page of multi-page files
                image = ImageOps.exif_transpose(image)
                return image.convert("RGB")  # decodes
        except ImageTooLargeError:
            raise
        except Image.DecompressionBombError as error:  # Pillow's own guard, when ours is switched off
            raise ImageTooLargeError(f"image {name}: {error}") from error
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
            raise CorruptImageError(f"cannot decode image {name}: {error}") from error


class _NormalizedFiles:
    """Stain-normalised images of files, the most recently used kept up to a budget of pixels.

    An evaluation asks several questions about each image (closed, open, multiple choice, the class
    choice) and PLIP reads it once more; the stain estimate is the costliest step of reading an image, so
    each file is normalised once. The dev-split suite of a normalised demo model took 70 s (127 CPU-s) with
    an estimate per question, 56 s (54 CPU-s) with one per file, for the same predictions. A file is known by
    its resolved path, size and modification time, so an image rewritten in place is read again.
    """

    def __init__(self, max_pixels: int = 64 * 1024 * 1024) -> None:
        self.max_pixels = max_pixels  # about 200 MB of RGB: every image of the three shared dev splits
        self.images: OrderedDict[tuple, Image.Image] = OrderedDict()
        self.pixels = 0
        self.lock = threading.Lock()

    @staticmethod
    def key(src: ImageSource, method: str) -> tuple | None:
        if not isinstance(src, (str, Path)):
            return None  # bytes, arrays and PIL images have no name to know them by
        try:
            path = Path(src).resolve()
            status = path.stat()
        except OSError:
            return None  # load_image names the problem
        return (str(path), status.st_size, status.st_mtime_ns, method)

    def get(self, key: tuple) -> Image.Image | None:
        with self.lock:
            image = self.images.get(key)
            if image is not None:
                self.images.move_to_end(key)
            return image

    def put(self, key: tuple, image: Image.Image) -> None:
        size = image.width * image.height
        if size > self.max_pixels:
            return
        with self.lock:
            if key in self.images:
                return
            self.images[key] = image
            self.pixels += size
            while self.pixels > self.max_pixels:
                _, old = self.images.popitem(last=False)
                self.pixels -= old.width * old.height


_NORMALIZED_FILES = _NormalizedFiles()


def load_normalized(
    src: ImageSource, method: str | None, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """`load_image` then `stain_normalize(image, method)`; a file is normalised once and its normalised
    image reused (`_NormalizedFiles`; the pixel limit is still checked each time). Callers must not
    change the image they get."""
    if method is None:
        return load_image(src, max_pixels)
    key = _NormalizedFiles.key(src, method)
    cached = _NORMALIZED_FILES.get(key) if key is not None else None
    if cached is not None:
        _check_pixels(*cached.size, max_pixels, _describe(src))
        return cached
    image = stain_normalize(load_image(src, max_pixels), method)
    if key is not None:
        _NORMALIZED_FILES.put(key, image)
    return image


def image_problem(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why an image file cannot be read, from its header alone (no pixels decoded): missing, not an image
    Pillow can decode, or over `max_pixels`; None when the header is sound."""
    path = Path(path)
    if not path.is_file():
        return "file not found"
    try:
        with Image.open(path) as image:
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        return f"cannot decode ({type(error).__name__})"
    return _over_limit(width, height, max_pixels)
