"""Parquet shards: the corpus on disk, written in a stream and read back with per-process sharding.

Each shard holds rows `(id, record)` (the record as JSON text) and, optionally, `image_bytes` so a shard
set is self-contained. The unit of distribution is a row group: with `R` processes, process `r` reads
row groups `r, r + R, ...` of the (optionally seeded-shuffled) list, so processes never overlap, their
union is the whole corpus, and nothing has to fit in memory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

SCHEMA = pa.schema([("id", pa.string()), ("record", pa.string()), ("image_bytes", pa.binary())])
INDEX_NAME = "index.json"


class _ShardWriter:
    """Buffers rows into row groups and rolls over to a new file every `records_per_shard` rows."""

    def __init__(self, out_dir: Path, prefix: str, records_per_shard: int, row_group_size: int) -> None:
        self.out_dir, self.prefix = out_dir, prefix
        self.records_per_shard, self.row_group_size = records_per_shard, row_group_size
        self.shards: list[dict[str, Any]] = []
        self._writer: pq.ParquetWriter | None = None
        self._partial: Path | None = None
        self._in_shard = 0
        self._rows: list[tuple[str, str, bytes | None]] = []

    def add(self, record_id: str, record: str, image: bytes | None) -> None:
        self._rows.append((record_id, record, image))
        if (
            len(self._rows) >= self.row_group_size
            or self._in_shard + len(self._rows) >= self.records_per_shard
        ):
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        if self._writer is None:
            name = f"{self.prefix}-{len(self.shards):05d}.parquet"
            self._partial = self.out_dir / (name + ".partial")
            self._writer = pq.ParquetWriter(self._partial, SCHEMA)
            self.shards.append({"file": name, "records": 0})
        ids, records, images = zip(*self._rows, strict=True)
        self._writer.write_table(pa.table([list(ids), list(records), list(images)], schema=SCHEMA))
        self._in_shard += len(self._rows)
        self.shards[-1]["records"] += len(self._rows)
        self._rows = []
        if self._in_shard >= self.records_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None and self._partial is not None:
            self._writer.close()
            self._partial.replace(self.out_dir / self.shards[-1]["file"])
        self._writer, self._partial, self._in_shard = None, None, 0

    def close(self) -> None:
        self._flush()
        self._close_shard()


def write_shards(
    records: Iterable[Any],
    out_dir: str | Path,
    records_per_shard: int = 10_000,
    row_group_size: int = 1_000,
    embed_images: bool = False,
    image_root: str | Path | None = None,
    prefix: str = "shard",
    progress: bool = True,
) -> list[Path]:
    """Stream records (dicts or objects with `to_dict`) into Parquet shards plus an `index.json`.

    With `embed_images`, each record's `image` file (relative paths resolved against `image_root`) is
    stored in the shard. Files appear under their final name only when complete.
    """
    if records_per_shard < 1 or row_group_size < 1:
        raise ValueError("records_per_shard and row_group_size must be at least 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob(f"{prefix}-*.parquet")):
        raise ValueError(f"{out}: already holds {prefix}-*.parquet shards; choose an empty folder")
    writer = _ShardWriter(out, prefix, records_per_shard, min(row_group_size, records_per_shard))
    for record in tqdm(records, desc="writing shards", unit="rec", disable=not progress):
        data = record.to_dict() if hasattr(record, "to_dict") else record
        if "id" not in data:
            raise ValueError(f"record without an 'id' field cannot be sharded: {json.dumps(data)[:80]}")
        image = None
        if embed_images and data.get("image"):
            path = Path(data["image"])
            path = path if path.is_absolute() or image_root is None else Path(image_root) / path
            if not path.is_file():
                raise ValueError(f"record {data['id']}: field 'image': file not found: {path}")
            image = path.read_bytes()
        writer.add(str(data["id"]), json.dumps(data, ensure_ascii=False), image)
    writer.close()
    index = {
        "schema": "pallava-shards/1",
        "shards": writer.shards,
        "records": sum(s["records"] for s in writer.shards),
        "images_embedded": embed_images,
    }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return [out / shard["file"] for shard in writer.shards]


def list_shards(path: str | Path) -> list[Path]:
    """The shard files of a folder (sorted) or a single `.parquet` file."""
    path = Path(path)
    if path.is_file():
        return [path]
    shards = sorted(path.glob("*.parquet"))
    if not shards:
        raise ValueError(f"{path}: no .parquet shards found")
    return shards


def _units(paths: list[Path]) -> list[tuple[Path, int, int]]:
    units = []
    for path in paths:
        metadata = pq.ParquetFile(path).metadata
        units.extend(
            (path, group, metadata.row_group(group).num_rows) for group in range(metadata.num_row_groups)
        )
    return units


def iter_shards(
    paths: Iterable[str | Path],
    rank: int = 0,
    world_size: int = 1,
    seed: int | None = None,
    epoch: int = 0,
    equal: bool = False,
    with_images: bool = False,
) -> Iterator[dict[str, Any]]:
    """Yield this process's records: row groups `rank::world_size` of the shard list.

    `seed` shuffles row groups and rows within them (the same order on every process, changing with
    `epoch`). `equal` truncates every process to the smallest share so collective training steps match.
    `with_images` adds the stored bytes under `image_bytes`.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    units = _units([Path(p) for p in paths])
    rng = random.Random(f"{seed}:{epoch}") if seed is not None else None
    if rng is not None:
        rng.shuffle(units)
    mine = units[rank::world_size]
    limit = min(sum(u[2] for u in units[r::world_size]) for r in range(world_size)) if equal else None
    columns = ["record", "image_bytes"] if with_images else ["record"]
    produced = 0
    for path, group, _ in mine:
        table = pq.ParquetFile(path).read_row_group(group, columns=columns)
        records = table.column("record").to_pylist()
        images = table.column("image_bytes").to_pylist() if with_images else [None] * len(records)
        order = list(range(len(records)))
        if rng is not None:
            random.Random(f"{seed}:{epoch}:{path.name}:{group}").shuffle(order)
        for index in order:
            if limit is not None and produced >= limit:
                return
            record = json.loads(records[index])
            if with_images:
                record["image_bytes"] = images[index]
            produced += 1
            yield record


class ShardStream(torch.utils.data.IterableDataset):
    """An IterableDataset over shards that splits by distributed rank and DataLoader worker."""

    def __init__(
        self,
        paths: Iterable[str | Path],
        rank: int = 0,
        world_size: int = 1,
        seed: int | None = None,
        equal: bool = False,
        with_images: bool = False,
    ) -> None:
        super().__init__()
        self.paths = [Path(p) for p in paths]
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.equal, self.with_images = equal, with_images
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Change the shuffle order (call once per epoch on every process)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        yield from iter_shards(
            self.paths,
            self.rank * workers + worker,
            self.world_size * workers,
            self.seed,
            self.epoch,
            equal=self.equal,
            with_images=self.with_images,
        )
