"""Duplicate detection: perceptual image hashes within a Hamming radius, and normalised captions.

Near-duplicate lookup uses multi-index hashing: with radius d the 64-bit hash is cut into d + 1 bands, and by
the pigeonhole principle any hash within distance d shares at least one band exactly, so each lookup only
compares against hashes in the matching band buckets instead of the whole corpus.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict

from PIL import Image

HASH_BITS = 64


def text_key(text: str) -> str:
    """A short key of the text after lowercasing and dropping punctuation and extra spaces."""
    normalised = " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())
    return hashlib.sha1(normalised.encode("utf-8")).hexdigest()[:16]


def image_hash(image: Image.Image) -> str:
    """The 64-bit DCT perceptual hash (imagehash.phash) as 16 hex digits."""
    import imagehash

    return str(imagehash.phash(image))


class DuplicateIndex:
    """Remembers kept records and finds an already-kept one that a new record duplicates.

    mode: `pair` (image within `max_hamming` AND same normalised text), `image`, `caption` or `either`.
    In `pair` mode the band buckets are scoped by text, so a common text costs nothing extra.
    """

    def __init__(self, mode: str = "pair", max_hamming: int = 4) -> None:
        self.mode, self.max_hamming = mode, max_hamming
        bands = max_hamming + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self._bands = [(edges[i], edges[i + 1] - edges[i]) for i in range(bands)]
        self._by_band: list[dict[tuple[str, int], list[tuple[int, str]]]] = [
            defaultdict(list) for _ in self._bands
        ]
        self._by_text: dict[str, str] = {}
        self._count = 0

    def _keys(self, value: int, scope: str) -> list[tuple[str, int]]:
        return [(scope, (value >> start) & ((1 << width) - 1)) for start, width in self._bands]

    def _near(self, value: int, scope: str) -> str | None:
        for band, key in zip(self._by_band, self._keys(value, scope), strict=True):
            for other, record_id in band.get(key, ()):
                if (other ^ value).bit_count() <= self.max_hamming:
                    return record_id
        return None

    def find(self, phash: str | None, text: str) -> str | None:
        """The id of an already-kept record this one duplicates, or None."""
        value = int(phash, 16) if phash else None
        if self.mode in ("caption", "either") and text in self._by_text:
            return self._by_text[text]
        if value is None:
            return None
        if self.mode in ("image", "either"):
            return self._near(value, "")
        if self.mode == "pair":
            return self._near(value, text)
        return None

    def add(self, record_id: str, phash: str | None, text: str) -> None:
        self._count += 1
        self._by_text.setdefault(text, record_id)
        if phash and self.mode != "caption":
            value = int(phash, 16)
            scope = text if self.mode == "pair" else ""
            for band, key in zip(self._by_band, self._keys(value, scope), strict=True):
                band[key].append((value, record_id))

    def __len__(self) -> int:
        return self._count
