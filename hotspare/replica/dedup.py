"""The disk-wide dedup index: which pack holds a chunk of a given digest.

A point's root names ``2**dedup_bits`` shards (absent: empty), each a create-only object of
rows (digest, pack, offset, length) for the digests whose first bits are the shard's number.
A consolidation looks up the digests of its new chunks there before writing them, so a chunk
already stored anywhere on the disk is stored once, and it rewrites only the shards its new
chunks fall in. The cost is at most one shard per new chunk (shards hold about
``SHARD_ROWS`` rows on a full disk), never the disk's size.

Shards are create-only objects, so a process keeps the ones it parsed (up to
:data:`CACHE_BYTES`): the part jobs of one consolidation that run in one process, and its
root, read each shard once.

A shard may name a pack that the point no longer reads (its chunks were overwritten, or
repacked): such a row is never used, because a build reads only from packs that its previous
point's root names (GC keeps those until a committed catalog drops them), and it is dropped
when its shard is next rewritten. A shard that cannot be read costs only dedup: the build
treats it as empty and says so.
"""

from __future__ import annotations

import hashlib
import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from hotspare import layout
from hotspare.errors import InvalidObject, NotFound
from hotspare.replica.index import IndexRoot, PageRef, page_ref
from hotspare.store.base import Store

log = logging.getLogger(__name__)

SHARD_MAGIC = b"HSDEDUP1"
ROW = np.dtype([("digest", "S32"), ("pack", "<u8"), ("offset", "<u4"), ("length", "<u4")])
SHARD_ROWS = 2048  # rows of a shard when every block of the disk holds a distinct chunk
MAX_BITS = 16
PARALLEL = 8  # shard reads and writes in flight: small objects, latency-bound
CACHE_BYTES = 64 << 20  # parsed shards a process keeps (a 16 GiB disk has about 12 MiB)


def prefix(digests: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each digest (an S32 array) as an integer: numpy matches integers
    several times faster than byte strings. Equal prefixes are only candidates."""
    return np.ascontiguousarray(digests, dtype="S32").view(np.uint8).reshape(-1, 32)[:, :8].copy().view("<u8").ravel()


@dataclass(frozen=True)
class Shard:
    """A shard's rows, and their digests' prefixes sorted (``order`` maps back to rows)."""

    rows: np.ndarray
    heads: np.ndarray
    order: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.heads.nbytes + self.order.nbytes

    @classmethod
    def of(cls, rows: np.ndarray) -> Shard:
        heads = prefix(rows["digest"])
        order = np.argsort(heads, kind="stable")
        return cls(rows, heads[order], order)


EMPTY = Shard.of(np.zeros(0, dtype=ROW))


class _ShardCache:
    """Parsed shards by key, least recently used dropped first; one read per key at a time."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._shards: OrderedDict[str, Shard] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._reading: dict[str, threading.Lock] = {}

    def peek(self, key: str) -> Shard | None:
        with self._lock:
            sh = self._shards.get(key)
            if sh is not None:
                self._shards.move_to_end(key)
            return sh

    def get(self, key: str, read: Callable[[], Shard]) -> Shard:
        sh = self.peek(key)
        if sh is not None:
            return sh
        with self._lock:
            busy = self._reading.setdefault(key, threading.Lock())
        with busy:  # a job that asks while another reads the same shard waits for that read
            sh = self.peek(key)
            if sh is None:
                sh = read()
                with self._lock:
                    self._shards[key] = sh
                    self._bytes += sh.nbytes
                    while self._bytes > self.limit and len(self._shards) > 1:
                        self._bytes -= self._shards.popitem(last=False)[1].nbytes
            with self._lock:
                self._reading.pop(key, None)
        return sh


_cache = _ShardCache(CACHE_BYTES)


def bits_for(chunks: int) -> int:
    """Shard bits for a disk of ``chunks`` blocks: about SHARD_ROWS rows per shard when full."""
    return min(MAX_BITS, max(0, math.ceil(math.log2(max(1, chunks) / SHARD_ROWS))))


def shard_numbers(digests: np.ndarray, bits: int) -> np.ndarray:
    """The shard of each digest (an S32 array): its first ``bits`` bits."""
    if bits == 0 or not len(digests):
        return np.zeros(len(digests), dtype=np.int64)
    head = np.ascontiguousarray(digests).view(np.uint8).reshape(-1, 32)[:, :4].copy().view(">u4").ravel()
    return (head >> np.uint32(32 - bits)).astype(np.int64)


def shard_bytes(shard: int, rows: np.ndarray) -> bytes:
    return SHARD_MAGIC + np.array([shard, len(rows)], dtype="<u8").tobytes() + rows.astype(ROW, copy=False).tobytes()


def parse_shard(key: str, data: bytes, ref: PageRef, shard: int) -> np.ndarray:
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise InvalidObject(key, "dedup shard does not match its SHA-256 in the root (damaged or replaced)")
    if data[:8] != SHARD_MAGIC:
        raise InvalidObject(key, "not a dedup shard (bad magic)")
    number, n = np.frombuffer(data[8:24], dtype="<u8").tolist()
    if number != shard or len(data) != 24 + n * ROW.itemsize:
        raise InvalidObject(key, f"dedup shard {number} with {n} rows in {len(data)} bytes, expected shard {shard}")
    return np.frombuffer(data, dtype=ROW, offset=24)


def read_shard(store: Store, root: IndexRoot, shard: int) -> np.ndarray:
    """The rows of ``shard`` of ``root`` (empty when absent), read from the store (no cache:
    ``check`` proves what is stored)."""
    ref = root.dedup.get(shard)
    if ref is None:
        return np.zeros(0, dtype=ROW)
    try:
        data = store.get(ref.key)
    except NotFound:
        raise InvalidObject(ref.key, f"dedup shard {shard} of point {root.point} is missing from the store") from None
    return parse_shard(ref.key, data, ref, shard)


def _read_or_empty(store: Store, root: IndexRoot, shard: int) -> Shard:
    """The shard, parsed once per process (its key names one create-only object, whose
    SHA-256 is checked when first parsed); a damaged one reads as empty, said once."""
    ref = root.dedup.get(shard)
    if ref is None:
        return EMPTY

    def read() -> Shard:
        try:
            return Shard.of(read_shard(store, root, shard))
        except InvalidObject as err:
            log.warning("%s: %s; its chunks are not deduplicated", err.key, err.reason)
            return EMPTY

    return _cache.get(_cache_key(ref), read)


def _cache_key(ref: PageRef) -> str:
    return f"{ref.key}#{ref.sha256}"


def _shards_of(store: Store, root: IndexRoot, shards: Iterable[int]) -> dict[int, Shard]:
    wanted = sorted(s for s in set(shards) if s in root.dedup)
    got = {s: sh for s in wanted if (sh := _cache.peek(_cache_key(root.dedup[s]))) is not None}
    missing = [s for s in wanted if s not in got]
    if missing:
        with ThreadPoolExecutor(min(PARALLEL, len(missing))) as pool:
            got.update(zip(missing, pool.map(lambda s: _read_or_empty(store, root, s), missing)))
    return got


def lookup(store: Store, root: IndexRoot | None, digests: list[bytes]) -> dict[bytes, tuple[int, int, int]]:
    """Where ``root``'s packs already hold a chunk of each of ``digests`` that it can:
    digest -> (pack, offset, length). Rows naming a pack the root does not read are skipped."""
    if root is None or root.dedup_bits is None or not root.dedup or not digests:
        return {}
    wanted = np.array(digests, dtype="S32")
    heads = prefix(wanted)
    numbers = shard_numbers(wanted, root.dedup_bits)
    shards = _shards_of(store, root, numbers.tolist())
    live = {int(p, 16) for p in root.packs}
    found: dict[bytes, tuple[int, int, int]] = {}
    for d, head, number in zip(digests, heads.tolist(), numbers.tolist()):
        sh = shards.get(number)
        if sh is None:
            continue
        lo, hi = np.searchsorted(sh.heads, head, "left"), np.searchsorted(sh.heads, head, "right")
        for j in sh.order[lo:hi].tolist():  # equal prefixes: compare the whole digest
            r = sh.rows[j]
            if int(r["pack"]) in live and bytes(r["digest"]).ljust(32, b"\0") == d:
                found.setdefault(d, (int(r["pack"]), int(r["offset"]), int(r["length"])))
                break
    return found


def update(store: Store, directory: str, previous: IndexRoot | None, root: IndexRoot, new: np.ndarray) -> int:
    """Give ``root`` (being built, its ``packs`` final) the dedup shards of ``previous`` plus
    the ``new`` rows (ROW: chunks this build wrote), writing each touched shard create-only
    under ``directory``; returns the bytes written."""
    bits = previous.dedup_bits if previous is not None and previous.dedup_bits is not None else bits_for(root.chunks)
    root.dedup_bits = bits
    root.dedup = dict(previous.dedup) if previous is not None and previous.dedup_bits == bits else {}
    if not len(new):
        return 0
    numbers = shard_numbers(new["digest"], bits)
    touched = np.unique(numbers).tolist()
    old = {n: sh.rows for n, sh in _shards_of(store, root, touched).items()}
    live = np.array([int(p, 16) for p in root.packs], dtype=np.uint64)

    def write(shard: int) -> tuple[int, PageRef, int]:
        rows = np.concatenate([old.get(shard, np.zeros(0, dtype=ROW)), new[numbers == shard]])
        rows = rows[np.isin(rows["pack"], live)]  # rows of packs this point no longer reads
        _, first = np.unique(rows["digest"], return_index=True)
        rows = rows[np.sort(first)]
        body = shard_bytes(shard, rows)
        key = layout.index_shard_key(directory, shard)
        store.put(key, body, create_only=True)
        return shard, page_ref(key, body), len(body)

    written = 0
    with ThreadPoolExecutor(min(PARALLEL, len(touched))) as pool:
        for shard, ref, size in pool.map(write, touched):
            root.dedup[shard] = ref
            written += size
    return written


def rows(entries: list[tuple[bytes, int, int, int]]) -> np.ndarray:
    """ROW array of (digest, pack, offset, length) tuples."""
    return np.array(entries, dtype=ROW) if entries else np.zeros(0, dtype=ROW)
