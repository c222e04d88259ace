"""Labelled images: CSV manifests (`path,label[,cluster,split]`) and class-per-folder trees."""

from __future__ import annotations

import csv
from pathlib import Path

from pallava.data.records import LabelledImage

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
REQUIRED_COLUMNS = ("path", "label")


def read_manifest(path: str | Path, split: str | None = None) -> list[LabelledImage]:
    """Read a manifest CSV; image paths are resolved against the manifest's folder.

    Rows are numbered as in a spreadsheet (header = row 1). A missing column, empty field or
    missing image file raises ValueError naming the file, row and field. `split` keeps only that split.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    root = path.parent.resolve()
    items: list[LabelledImage] = []
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: header must contain columns path,label[,cluster,split]; missing {missing}"
            )
        if split is not None and "split" not in columns:
            raise ValueError(f"{path}: split '{split}' requested but the manifest has no 'split' column")
        reader.fieldnames = columns
        for row_number, row in enumerate(reader, start=2):
            if None in row:
                raise ValueError(f"{path}: row {row_number}: more fields than header columns")
            for column in REQUIRED_COLUMNS:
                if not (row.get(column) or "").strip():
                    raise ValueError(f"{path}: row {row_number}: field '{column}' is empty")
            row_split = (row.get("split") or "").strip() or None
            if split is not None and row_split != split:
                continue
            image = (root / row["path"].strip()).resolve()
            if not image.is_file():
                raise ValueError(f"{path}: row {row_number}: field 'path': image file not found: {image}")
            items.append(
                LabelledImage(
                    path=str(image),
                    label=row["label"].strip(),
                    cluster=(row.get("cluster") or "").strip() or None,
                    split=row_split,
                )
            )
    if not items:
        raise ValueError(f"{path}: no rows" + (f" with split '{split}'" if split is not None else ""))
    return items


def is_image_folder(path: str | Path) -> bool:
    """Whether `path` is an image folder laid out as `root/<class>/<image>`: a folder without `manifest.csv`
    (a folder with one stands for its manifest)."""
    path = Path(path)
    return path.is_dir() and not (path / "manifest.csv").is_file()


def holds_labelled_images(path: str | Path) -> bool:
    """Whether `read_labelled_images` reads `path`: a manifest CSV or a folder (its manifest.csv, or an image
    folder)."""
    path = Path(path)
    return path.suffix.lower() == ".csv" or path.is_dir()


def read_labelled_images(source: str | Path, split: str | None = None) -> list[LabelledImage]:
    """Labelled images from a manifest CSV, a folder holding `manifest.csv`, or an image folder laid out as
    `root/<class>/<image>` (how many public datasets ship). An image folder has no splits: asking for one
    is an error, not an empty result."""
    path = Path(source)
    if not is_image_folder(path):
        return read_manifest(path / "manifest.csv" if path.is_dir() else path, split)
    if split is not None:
        raise ValueError(
            f"{path}: an image folder (root/<class>/<image>) has no splits, but split '{split}' was asked "
            "for; drop the split, or write a manifest (path,label,split)"
        )
    return read_image_folder(path)


def read_image_folder(root: str | Path) -> list[LabelledImage]:
    """Read `root/<class>/<image>`: the class is the sub-folder name; files sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: image folder not found")
    items = [
        LabelledImage(path=str(image.resolve()), label=class_dir.name)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for image in sorted(class_dir.iterdir())
        if image.is_file() and image.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ValueError(f"{root}: no images found in class sub-folders (expected root/<class>/<image>)")
    return items
