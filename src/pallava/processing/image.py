"""The paper's dynamic high-resolution tiling (loading with safety limits: `processing.loading`).

An image becomes a stack of square crops `[global, tile_1, ..., tile_n]`:

* the tiles: the image is resized (aspect kept) onto the best grid of `tile_size` squares and padded
  black (centred), then cut row-major;
* the global view: the whole image resized (aspect kept) into one `tile_size` square and padded black
  the same way. The reference code stretches the global view while padding the tiles; letterboxing both
  keeps one geometry for every crop (a circle stays a circle in all of them). `global_view="stretch"`
  reproduces the reference behaviour, for weights trained that way.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import select_best_resolution

from pallava.files import read_json_object
from pallava.processing.loading import DEFAULT_MAX_PIXELS, ImageSource, load_normalized
from pallava.processing.stain_norm import check_stain_normalize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The reference grid list, as (columns, rows) in tiles: 4 to 8 tiles.
PAPER_GRIDS: tuple[tuple[int, int], ...] = (
    (1, 4),
    (2, 2),
    (4, 1),
    (1, 5),
    (5, 1),
    (1, 6),
    (2, 3),
    (3, 2),
    (6, 1),
    (1, 7),
    (7, 1),
    (1, 8),
    (2, 4),
    (4, 2),
    (8, 1),
)

# Allowed image-processor settings (inclusive). The paper uses 224 px tiles and at most 8 of them.
TILE_SIZE_RANGE = (8, 1024)
MAX_TILES_RANGE = (1, 64)
MAX_PIXELS_RANGE = (1, 1 << 28)  # 16384 x 16384; Pillow refuses 179M-pixel images on its own anyway
GRID_POLICIES = ("default", "paper")
GLOBAL_VIEWS = ("letterbox", "stretch")
# What fills a letterbox around an image of another aspect ratio. `mirror`: the image continued by
# reflection, as the zoom-out augmentation continues tiles in training, so a model trained on square tiles
# never meets a band it has not seen (PLIP's zero-shot accuracy on dev tiles cropped to 3:2 fell to 0.48 /
# 0.50 / 0.77 with black bands, 0.91 / 0.88 / 0.87 mirrored; docs/model.md). `black`: the reference code's.
PADDINGS = ("mirror", "black")


def _check_int(name: str, value: object, low: int, high: int, prefix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be {prefix}an integer from {low:,} to {high:,}, got {value!r}")


def check_max_pixels(value: object, field: str = "max_pixels") -> int | None:
    """`value` if it is a valid pixel limit (None: no limit); otherwise a ValueError naming `field`."""
    if value is not None:  # a command-line option has no null to offer
        prefix = "" if field.startswith("--") else "null (no limit) or "
        _check_int(field, value, *MAX_PIXELS_RANGE, prefix=prefix)
    return value


def grid_candidates(policy: str, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """Grids (columns, rows) allowed by a tiling policy.

    `paper`: the reference list (4-8 tiles). `default`: every grid with at most `max_tiles` tiles,
    1x1 included, so a small image is not blown up.
    """
    if policy == "paper":
        return tuple(g for g in PAPER_GRIDS if g[0] * g[1] <= max(max_tiles, 4))
    if policy == "default":
        return tuple(
            (c, r) for r in range(1, max_tiles + 1) for c in range(1, max_tiles + 1) if c * r <= max_tiles
        )
    raise ValueError(f"unknown grid policy {policy!r}; expected 'default' or 'paper'")


def select_grid(
    image_size: tuple[int, int], grids: Sequence[tuple[int, int]], tile_size: int
) -> tuple[int, int]:
    """Best grid for a (width, height) image: most effective resolution, then least waste."""
    width, height = image_size
    resolutions = [(rows * tile_size, cols * tile_size) for cols, rows in grids]  # (height, width)
    best_h, best_w = select_best_resolution((height, width), resolutions)
    return best_w // tile_size, best_h // tile_size


def as_uint8_tensor(image: Image.Image | np.ndarray) -> torch.Tensor:
    """An RGB image as a (H, W, 3) uint8 tensor over `np.asarray(image)`'s buffer, without another copy.

    PIL hands numpy a read-only buffer; the tensor must only be read (every function here makes new
    tensors), which saves a full-image copy (2-5 ms on a 2048x1536 image).
    """
    array = np.asarray(image, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def resize_uint8(pixels: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize of a (H, W, 3) uint8 image to (height, width, 3); `pixels` itself if same
    size.

    torch's uint8 channels-last kernel uses PIL's filter (a = -0.5, support widened on downscaling): its
    output is within 1-2 grey levels of `Image.resize(..., BICUBIC)` and 4-7x faster, which makes it most
    of the gain in preprocessing large images.
    """
    if tuple(pixels.shape[:2]) == (height, width):
        return pixels
    batch = pixels.permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W) with channels-last strides: no copy
    resized = F.interpolate(batch, size=(height, width), mode="bicubic", antialias=True)
    return resized[0].permute(1, 2, 0)


def letterbox_box(image_size: tuple[int, int], width: int, height: int) -> tuple[int, int, int, int]:
    """Where `letterbox` puts an image of (width, height) `image_size`: (left, top, right, bottom)."""
    scale = min(width / image_size[0], height / image_size[1])
    new_w, new_h = max(1, round(image_size[0] * scale)), max(1, round(image_size[1] * scale))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return left, top, left + new_w, top + new_h


def letterbox_pixels(pixels: torch.Tensor, width: int, height: int, padding: str = "mirror") -> torch.Tensor:
    """Resize a (H, W, 3) uint8 image with the aspect ratio kept to fit (width, height), centred, the rest
    filled by `padding` (`PADDINGS`: the image mirrored at its edges, or black).

    Returns `pixels` itself when it already has that size.
    """
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {', '.join(map(repr, PADDINGS))}, got {padding!r}")
    left, top, right, bottom = letterbox_box((pixels.shape[1], pixels.shape[0]), width, height)
    resized = resize_uint8(pixels, right - left, bottom - top)
    if (right - left, bottom - top) == (width, height):
        return resized
    if padding == "mirror":  # numpy's `symmetric` repeats the reflection when a band is wider than the image
        bands = ((top, height - bottom), (left, width - right), (0, 0))
        return torch.from_numpy(np.pad(resized.numpy(), bands, mode="symmetric"))
    canvas = torch.zeros(height, width, 3, dtype=torch.uint8)
    canvas[top:bottom, left:right] = resized
    return canvas


def heat_on_image(
    heat: np.ndarray, grid: tuple[int, int], tile_size: int, image_size: tuple[int, int]
) -> np.ndarray:
    """A heat map over the letterboxed tile canvas, laid back onto the original (width, height) image.

    `heat` (rows*side, cols*side) covers the canvas of `grid` (columns, rows) tiles; the letterbox is
    undone so each value lands on the part of the image that tile patch saw. Returns (height, width) floats.
    """
    cols, rows = grid
    canvas_w, canvas_h = cols * tile_size, rows * tile_size
    field = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize(
        (canvas_w, canvas_h), Image.BILINEAR
    )
    field = field.crop(letterbox_box(image_size, canvas_w, canvas_h)).resize(image_size, Image.BILINEAR)
    return np.asarray(field)


def letterbox(image: Image.Image, width: int, height: int, padding: str = "mirror") -> Image.Image:
    """`letterbox_pixels` for a PIL image, returning a PIL image."""
    return Image.fromarray(letterbox_pixels(as_uint8_tensor(image), width, height, padding).numpy())


_MEAN = torch.from_numpy(np.array(CLIP_MEAN, dtype=np.float32) * 255.0).view(3, 1, 1)
_INV_STD = torch.from_numpy(1.0 / (np.array(CLIP_STD, dtype=np.float32) * 255.0)).view(3, 1, 1)


def normalize_into(pixels: np.ndarray | torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """CLIP-normalise uint8 (..., H, W, 3) into the float32 tensor `out` (..., 3, H, W) and return it.

    One strided uint8->float copy and two in-place passes: no float temporaries (numpy's version made five
    passes, most of the preprocessing time of small images).
    """
    if isinstance(pixels, np.ndarray):
        pixels = torch.from_numpy(
            pixels if pixels.flags.writeable else pixels.copy()
        )  # PIL arrays are read-only
    out.copy_(pixels.movedim(-1, -3))
    return out.sub_(_MEAN).mul_(_INV_STD)


def normalize(array: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> CLIP-normalised float32 (..., 3, H, W)."""
    out = torch.empty(*array.shape[:-3], 3, *array.shape[-3:-1])
    return normalize_into(array, out).numpy()


def normalize_to_tensor(image: Image.Image, size: int, padding: str = "mirror") -> torch.Tensor:
    """One square view of an image (letterboxed global view), CLIP-normalised: (3, size, size)."""
    square = letterbox_pixels(as_uint8_tensor(image), size, size, padding)
    return normalize_into(square, torch.empty(3, size, size))


def tiles_with_pixels(image_size: tuple[int, int], grid: tuple[int, int], tile_size: int) -> torch.Tensor:
    """(cols*rows,) bool, row-major: True for each tile of the letterboxed canvas that holds image pixels.

    A grid can be larger than the image needs (the paper's list has no 1x1, so a 224 px image lands on
    1x4 with an empty tile above and below); tiles of pure padding must not be attention keys.
    """
    cols, rows = grid
    left, top, right, bottom = letterbox_box(image_size, cols * tile_size, rows * tile_size)
    starts_x, starts_y = torch.arange(cols) * tile_size, torch.arange(rows) * tile_size
    in_x = (starts_x < right) & (starts_x + tile_size > left)  # (cols,)
    in_y = (starts_y < bottom) & (starts_y + tile_size > top)  # (rows,)
    return (in_y[:, None] & in_x[None, :]).reshape(-1)


@dataclass
class TiledImage:
    """An image cut into crops: `pixel_values` is (1 + cols*rows, 3, S, S), global view first;
    `tile_mask` (cols*rows,) is False for tiles of pure padding."""

    pixel_values: torch.Tensor
    grid: tuple[int, int]  # (columns, rows)
    original_size: tuple[int, int]  # (width, height)
    tile_mask: torch.Tensor
    key: str | None = None  # a digest of the image's content, for caches of its features (the server's)

    @property
    def num_tiles(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class PaLlavaImageProcessor:
    """Anyres tiling + CLIP normalisation. `grid_policy` is `default` (1..max_tiles tiles) or `paper`;
    `global_view` is `letterbox` (aspect kept) or `stretch` (the reference code's); `padding` fills the
    letterbox of the global view and the tile canvas (`PADDINGS`); `stain_normalize` (e.g. `macenko`) maps
    every image onto reference H&E stains first, as the vision tower was trained (`processing.stain_norm`)."""

    tile_size: int = 224
    grid_policy: str = "default"
    max_tiles: int = 8
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    global_view: str = "letterbox"
    padding: str = "mirror"
    stain_normalize: str | None = None
    grids: tuple[tuple[int, int], ...] = field(init=False)

    CONFIG_NAME = "preprocessor_config.json"
    _auto_class = None  # read by transformers' ProcessorMixin.save_pretrained (no custom code to copy)

    def __post_init__(self) -> None:
        # Settings come from model folders too: refuse what would hang (a grid search over 100,000 tiles),
        # blow up memory or silently switch the pixel guard off, naming the field and what is allowed.
        _check_int("tile_size", self.tile_size, *TILE_SIZE_RANGE)
        _check_int("max_tiles", self.max_tiles, *MAX_TILES_RANGE)
        check_max_pixels(self.max_pixels)
        for name, allowed in (
            ("grid_policy", GRID_POLICIES),
            ("global_view", GLOBAL_VIEWS),
            ("padding", PADDINGS),
        ):
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ValueError(
                    f"{name} must be one of {', '.join(map(repr, allowed))}, got {getattr(self, name)!r}"
                )
        check_stain_normalize(self.stain_normalize)
        self.grids = grid_candidates(self.grid_policy, self.max_tiles)

    @property
    def max_grid_tiles(self) -> int:
        return max(c * r for c, r in self.grids)

    def select_grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return select_grid(image_size, self.grids, self.tile_size)

    def tile(self, src: ImageSource) -> TiledImage:
        """Load (with limits), stain-normalise if set, and cut one image into [global, tiles...]."""
        image = load_normalized(src, self.stain_normalize, self.max_pixels)
        pixels = as_uint8_tensor(image)  # (H, W, 3); both views are resized from it, in torch
        size = self.tile_size
        cols, rows = self.select_grid(image.size)
        if self.global_view == "stretch":
            global_view = resize_uint8(pixels, size, size)
        else:
            global_view = letterbox_pixels(pixels, size, size, self.padding)
        pixel_values = torch.empty(1 + cols * rows, 3, size, size)
        normalize_into(global_view, pixel_values[0])
        canvas = letterbox_pixels(pixels, cols * size, rows * size, self.padding)  # (rows*S, cols*S, 3)
        tiles = canvas.reshape(rows, size, cols, size, 3).permute(0, 2, 1, 3, 4)  # (rows, cols, S, S, 3) view
        normalize_into(tiles, pixel_values[1:].view(rows, cols, 3, size, size))  # written in place, row-major
        keep = tiles_with_pixels(image.size, (cols, rows), size)
        return TiledImage(
            pixel_values=pixel_values, grid=(cols, rows), original_size=image.size, tile_mask=keep
        )

    def __call__(self, images: Sequence[ImageSource]) -> dict[str, torch.Tensor]:
        """Batch of images -> `pixel_values` (N, 1+T, 3, S, S) zero-padded, `tile_mask` (N, T) bool (True for
        tiles that hold image pixels), `grids` (N, 2)."""
        tiled = [self.tile(image) for image in images]
        return self.stack(tiled)

    @staticmethod
    def stack(tiled: Sequence[TiledImage]) -> dict[str, torch.Tensor]:
        if not tiled:
            raise ValueError("no images to stack")
        max_tiles = max(t.num_tiles for t in tiled)
        size = tiled[0].pixel_values.shape[-1]
        tile_mask = torch.zeros(len(tiled), max_tiles, dtype=torch.bool)
        if len(tiled) == 1:  # one image (a chat turn): a view, no copy
            pixel_values = tiled[0].pixel_values.unsqueeze(0)
        else:
            pixel_values = torch.empty(len(tiled), 1 + max_tiles, 3, size, size)
            for i, t in enumerate(tiled):
                pixel_values[i, : 1 + t.num_tiles] = t.pixel_values
                pixel_values[i, 1 + t.num_tiles :] = 0  # zero only the padding, not the whole batch first
        for i, t in enumerate(tiled):
            tile_mask[i, : t.num_tiles] = t.tile_mask
        grids = torch.tensor([t.grid for t in tiled], dtype=torch.long)
        return {"pixel_values": pixel_values, "tile_mask": tile_mask, "grids": grids}

    def to_dict(self) -> dict:
        data = asdict(self)
        data.pop("grids")
        return data

    def save_pretrained(self, directory: str | Path) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / self.CONFIG_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PaLlavaImageProcessor:
        path = Path(directory) / cls.CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {cls.CONFIG_NAME} in {directory}")
        data = read_json_object(path)
        # the settings are the constructor's fields: one added to the class is read back without a list here
        known = {f.name: data[f.name] for f in fields(cls) if f.init and f.name in data}
        try:
            return cls(**known)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
