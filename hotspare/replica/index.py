"""A point's index: entries (block -> chunk), pages of entries, and the root naming them."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

import numpy as np
import xxhash
from pydantic import BaseModel, Field, ValidationError

from hotspare.errors import InvalidObject, NotFound, field_error
from hotspare.store.base import Store

INDEX_FORMAT = 1
PAGE_CHUNKS = 1024  # entries per page: 56 KiB of index per 64 MiB of disk
PAGE_MAGIC = b"HSPAGE1\0"
ENTRY = np.dtype([("digest", "S32"), ("xxh", "<u8"), ("pack", "<u8"), ("offset", "<u4"), ("length", "<u4")])


def digest_of(entry) -> bytes:
    """An entry's 32-byte digest (numpy's S32 drops trailing zero bytes when reading)."""
    return bytes(entry["digest"]).ljust(32, b"\0")


class PageRef(BaseModel):
    key: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class PackRef(BaseModel):
    key: str
    size: int = Field(ge=0, description="bytes of the pack object")
    chunks: int = Field(ge=0, description="chunks the pack holds")
    refs: int = Field(ge=0, description="entries of this point that read from it")


class IndexRoot(BaseModel):
    """A point's index. ``pages`` maps page number to page (absent: all zeros); ``packs``
    maps pack id (16 hex digits) to the pack, for every pack the pages reference; ``dedup``
    maps shard number to a shard of the dedup index."""

    format_version: int = INDEX_FORMAT
    machine: str
    disk: str
    point: str
    disk_size: int = Field(gt=0)
    chunk_size: int = Field(gt=0)
    page_chunks: int = Field(PAGE_CHUNKS, gt=0)
    pages: dict[int, PageRef] = Field(default_factory=dict)
    packs: dict[str, PackRef] = Field(default_factory=dict)
    # The disk-wide dedup index (hotspare.replica.dedup); None in roots written before it.
    dedup_bits: int | None = Field(None, ge=0, le=16)
    dedup: dict[int, PageRef] = Field(default_factory=dict)

    @property
    def chunks(self) -> int:
        return -(-self.disk_size // self.chunk_size)

    @property
    def page_count(self) -> int:
        return -(-self.chunks // self.page_chunks)

    def chunk_length(self, block: int) -> int:
        return min(self.chunk_size, self.disk_size - block * self.chunk_size)

    def stored_bytes(self) -> int:
        return sum(p.size for p in self.packs.values())


def pack_id(hex_id: str | int) -> str:
    return hex_id if isinstance(hex_id, str) else f"{hex_id:016x}"


@lru_cache(maxsize=64)
def _zero_xxh(length: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(length))


def zero_page(root: IndexRoot, page: int) -> np.ndarray:
    """The entries of a page of zeros (xxh: the hash of each block's zeros)."""
    first = page * root.page_chunks
    n = min(root.page_chunks, root.chunks - first)
    entries = np.zeros(n, dtype=ENTRY)
    entries["xxh"] = _zero_xxh(root.chunk_size)
    last = root.chunks - 1
    if first <= last < first + n and root.chunk_length(last) != root.chunk_size:
        entries["xxh"][last - first] = _zero_xxh(root.chunk_length(last))
    return entries


def page_bytes(page: int, entries: np.ndarray) -> bytes:
    head = PAGE_MAGIC + np.array([page, len(entries)], dtype="<u8").tobytes()
    return head + entries.astype(ENTRY, copy=False).tobytes()


def parse_page(key: str, data: bytes, sha256: str, page: int, expected: int) -> np.ndarray:
    if hashlib.sha256(data).hexdigest() != sha256:
        raise InvalidObject(key, "index page does not match its SHA-256 in the root (damaged or replaced)")
    if data[:8] != PAGE_MAGIC:
        raise InvalidObject(key, "not an index page (bad magic)")
    number, n = np.frombuffer(data[8:24], dtype="<u8").tolist()
    if number != page or n != expected or len(data) != 24 + n * ENTRY.itemsize:
        raise InvalidObject(key, f"index page {number} with {n} entries, expected page {page} with {expected}")
    return np.frombuffer(data, dtype=ENTRY, offset=24)


def read_page(store: Store, root: IndexRoot, page: int) -> np.ndarray:
    """The entries of ``page`` (read-only array; a page of zeros when the root has none)."""
    ref = root.pages.get(page)
    if ref is None:
        return zero_page(root, page)
    try:
        data = store.get(ref.key)
    except NotFound:
        raise InvalidObject(ref.key, f"index page {page} of point {root.point} is missing from the store") from None
    return parse_page(ref.key, data, ref.sha256, page, len(zero_page(root, page)))


def page_ref(key: str, data: bytes) -> PageRef:
    return PageRef(key=key, sha256=hashlib.sha256(data).hexdigest())


def read_root(store: Store, key: str) -> IndexRoot:
    try:
        raw = store.get(key)
    except NotFound:
        raise InvalidObject(key, "index root missing from the store") from None
    try:
        root = IndexRoot.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as err:
        reason = field_error(err) if isinstance(err, ValidationError) else f"not JSON ({err})"
        raise InvalidObject(key, f"index root does not parse: {reason}") from None
    if root.format_version != INDEX_FORMAT:
        raise InvalidObject(key, f"index format {root.format_version} is unknown (this hotspare reads {INDEX_FORMAT})")
    return root


def root_bytes(root: IndexRoot) -> bytes:
    return root.model_dump_json().encode()
