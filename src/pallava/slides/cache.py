"""A resumable on-disk cache of tile embeddings, keyed by level-0 tile boxes.

The cache is a folder: `meta.json` (which slide, model and tiling produced it) and append-only
`part-NNNNNN.npz` files, each holding `boxes` (N, 4) int64 and `vectors` (N, D) float32. Parts
are written atomically, so an interrupted run loses at most the unflushed batch and a re-run
embeds only the tiles that are missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pallava.slides.tiling import Tile


class EmbeddingCache:
    """Tile embeddings for one (slide, model, tiling); `meta` must match what is on disk."""

    def __init__(self, folder: str | Path, meta: dict, flush_every: int = 1024):
        self.folder = Path(folder)
        self.meta = dict(meta)
        self.flush_every = flush_every
        self._index: dict[tuple[int, int, int, int], int] = {}
        self._chunks: list[np.ndarray] = []
        self._pending_boxes: list[tuple[int, int, int, int]] = []
        self._pending_vectors: list[np.ndarray] = []
        self._parts = 0
        self._vectors: np.ndarray | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        meta_path = self.folder / "meta.json"
        if meta_path.exists():
            stored = json.loads(meta_path.read_text())
            if stored != self.meta:
                changed = sorted(k for k in set(stored) | set(self.meta) if stored.get(k) != self.meta.get(k))
                raise ValueError(
                    f"{self.folder}: the cached embeddings were made with different settings "
                    f"({', '.join(changed)}); choose another --out folder or delete this one"
                )
            self._load_parts()
        else:
            meta_path.write_text(json.dumps(self.meta, indent=2, sort_keys=True))

    def _load_parts(self) -> None:
        for part in sorted(self.folder.glob("part-[0-9][0-9][0-9][0-9][0-9][0-9].npz")):
            try:
                with np.load(part) as data:
                    boxes, vectors = data["boxes"], data["vectors"]
            except (OSError, ValueError, KeyError) as error:
                raise ValueError(
                    f"{part}: unreadable embedding cache part ({error}); delete it to recompute"
                ) from error
            if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(vectors):
                raise ValueError(
                    f"{part}: expected boxes (N, 4) and vectors (N, D), got {boxes.shape} and {vectors.shape}"
                )
            self._add_to_index([tuple(int(v) for v in box) for box in boxes], vectors.astype(np.float32))
            self._parts += 1

    def _add_to_index(self, boxes: list[tuple[int, int, int, int]], vectors: np.ndarray) -> None:
        offset = sum(len(chunk) for chunk in self._chunks)
        self._chunks.append(vectors)
        self._vectors = None
        for i, box in enumerate(boxes):
            self._index[box] = offset + i

    def __len__(self) -> int:
        return len(self._index) + len(self._pending_boxes)

    def __contains__(self, tile: Tile) -> bool:
        return tile.box in self._index

    def missing(self, tiles: Sequence[Tile]) -> list[Tile]:
        """The tiles whose embeddings are not cached yet, in the given order."""
        pending = set(self._pending_boxes)
        return [t for t in tiles if t.box not in self._index and t.box not in pending]

    def add(self, tiles: Sequence[Tile], vectors: np.ndarray) -> None:
        """Record embeddings for `tiles`; they reach disk every `flush_every` tiles and on `flush()`."""
        if len(tiles) != len(vectors):
            raise ValueError(f"got {len(tiles)} tiles but {len(vectors)} embedding vectors")
        self._pending_boxes.extend(t.box for t in tiles)
        self._pending_vectors.extend(np.asarray(vectors, dtype=np.float32))
        if len(self._pending_boxes) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write pending embeddings as a new part file (atomically: temp file, then rename)."""
        if not self._pending_boxes:
            return
        boxes = np.asarray(self._pending_boxes, dtype=np.int64)
        vectors = np.stack(self._pending_vectors)
        path = self.folder / f"part-{self._parts:06d}.npz"
        temporary = path.with_suffix(".tmp.npz")
        np.savez(temporary, boxes=boxes, vectors=vectors)
        os.replace(temporary, path)
        self._parts += 1
        self._add_to_index(list(self._pending_boxes), vectors)
        self._pending_boxes, self._pending_vectors = [], []

    def vectors_for(self, tiles: Sequence[Tile]) -> np.ndarray:
        """Embeddings (N, D) for `tiles`, which must all be cached (call `flush()` first)."""
        if self._vectors is None:
            self._vectors = np.concatenate(self._chunks) if self._chunks else np.zeros((0, 0), np.float32)
            self._chunks = [self._vectors]
        try:
            rows = [self._index[t.box] for t in tiles]
        except KeyError as error:
            raise ValueError(f"{self.folder}: no cached embedding for tile box {error.args[0]}") from error
        return self._vectors[rows]
