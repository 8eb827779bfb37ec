"""Reading any byte range of a point from its chunks: the one reader of export, serve,
failover and failback.

Entries come from the point's pages (kept in a small cache); chunks from their packs, each
run of chunks stored back to back in one pack fetched with one ranged read, and each chunk
checked against its SHA-256 before use. Chunks are kept in an LRU cache by digest, so a
chunk that several blocks share is fetched once, and a sequential reader gets the next
``readahead`` bytes in the same request.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from hotspare.errors import InvalidObject, NotFound
from hotspare.replica.index import IndexRoot, digest_of, pack_id, read_page
from hotspare.store.base import Store

PAGES_CACHED = 256


class ChunkReader:
    def __init__(self, store: Store, root: IndexRoot, *, cache_bytes: int = 256 << 20, readahead: int = 4 << 20,
                 verify: bool = True) -> None:
        self.store, self.root = store, root
        self.size = root.disk_size
        self.cache_bytes, self.readahead, self.verify = cache_bytes, readahead, verify
        self._pages: OrderedDict[int, np.ndarray] = OrderedDict()
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._cached = 0
        self._last_end = -1
        self._lock = threading.Lock()
        self.fetched = 0  # bytes read from packs

    def page(self, n: int) -> np.ndarray:
        with self._lock:
            got = self._pages.get(n)
            if got is not None:
                self._pages.move_to_end(n)
                return got
        entries = read_page(self.store, self.root, n)
        with self._lock:
            self._pages[n] = entries
            while len(self._pages) > PAGES_CACHED:
                self._pages.popitem(last=False)
        return entries

    def entries(self, first: int, last: int) -> np.ndarray:
        """The entries of blocks ``first`` to ``last`` inclusive."""
        pc = self.root.page_chunks
        parts = []
        for p in range(first // pc, last // pc + 1):
            e = self.page(p)
            lo, hi = max(first - p * pc, 0), min(last - p * pc + 1, len(e))
            parts.append(e[lo:hi])
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def read(self, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(f"read of {length} bytes at {offset} is outside the disk of {self.size} bytes")
        if length == 0:
            return b""
        cs = self.root.chunk_size
        first, last = offset // cs, (offset + length - 1) // cs
        ahead = last
        if offset == self._last_end and self.readahead:
            ahead = min(self.root.chunks - 1, last + self.readahead // cs)
        self._last_end = offset + length
        ents = self.entries(first, ahead)
        got = self._fetch_entries(ents, range(first, first + len(ents)))
        stored = np.flatnonzero(ents["length"][: last - first + 1]).tolist()
        if not stored:
            return bytes(length)  # zeros (never stored): no buffer to fill and copy
        out = bytearray(length)
        for i in stored:
            b = first + i
            digest = digest_of(ents[i])
            chunk = got[digest]
            lo, hi = max(offset, b * cs), min(offset + length, b * cs + len(chunk))
            out[lo - offset:hi - offset] = chunk[lo - b * cs:hi - b * cs]
        return bytes(out)

    def _fetch_entries(self, ents: np.ndarray, numbers) -> dict[bytes, bytes]:
        """Fetch every chunk of ``ents`` not in the cache, one ranged read per run of chunks
        adjacent in one pack; returns them (the cache may not keep them all)."""
        got: dict[bytes, bytes] = {}
        want = []
        with self._lock:  # what is cached goes into ``got`` now: caching more may evict it
            for i in np.flatnonzero(ents["length"]).tolist():
                digest = digest_of(ents[i])
                cached = self._chunks.get(digest)
                if cached is None:
                    want.append(i)
                else:
                    self._chunks.move_to_end(digest)
                    got[digest] = cached
        runs: list[list[int]] = []
        for i in sorted(set(want), key=lambda i: (int(ents[i]["pack"]), int(ents[i]["offset"]))):
            e = ents[i]
            if runs:
                p = ents[runs[-1][-1]]
                if p["pack"] == e["pack"] and int(p["offset"]) + int(p["length"]) == int(e["offset"]):
                    runs[-1].append(i)
                    continue
                if p["pack"] == e["pack"] and p["offset"] == e["offset"]:
                    continue  # the same chunk again (deduplicated within the range)
            runs.append([i])
        for run in runs:
            self._fetch_run(ents, run, numbers, got)
        return got

    def _fetch_run(self, ents: np.ndarray, run: list[int], numbers, got: dict[bytes, bytes]) -> None:
        e0, en = ents[run[0]], ents[run[-1]]
        ref = self.root.packs.get(pack_id(int(e0["pack"])))
        block = numbers[run[0]]
        if ref is None:
            raise InvalidObject(self.root.point, f"block {block} reads from pack {pack_id(int(e0['pack']))}, "
                                                 "which the index root does not name")
        start = int(e0["offset"])
        n = int(en["offset"]) + int(en["length"]) - start
        try:
            data = self.store.get_range(ref.key, start, n)
        except NotFound:
            raise InvalidObject(ref.key, f"pack missing from the store (point {self.root.point} reads "
                                         f"block {block} from it)") from None
        if len(data) != n:
            raise InvalidObject(ref.key, f"pack ended at byte {start + len(data)}, block {block} needs up to {start + n}")
        self.fetched += n
        view = memoryview(data)
        with self._lock:
            for i in run:
                e = ents[i]
                a = int(e["offset"]) - start
                chunk = bytes(view[a:a + int(e["length"])])
                digest = digest_of(e)
                if self.verify and hashlib.sha256(chunk).digest() != digest:
                    raise InvalidObject(ref.key, f"chunk at byte {int(e['offset'])} (block {numbers[i]} of point "
                                                 f"{self.root.point}) fails its SHA-256: the pack is damaged")
                got[digest] = chunk
                if digest not in self._chunks:
                    self._chunks[digest] = chunk
                    self._cached += len(chunk)
            while self._cached > self.cache_bytes and len(self._chunks) > 1:
                _, old = self._chunks.popitem(last=False)
                self._cached -= len(old)

    def blocks(self, numbers: list[int]) -> dict[int, bytes]:
        """The content of each block in ``numbers`` (fetched in runs, as ``read`` does)."""
        numbers = sorted(set(numbers))
        if not numbers:
            return {}
        pc = self.root.page_chunks
        ents = np.concatenate([self.page(b // pc)[b % pc: b % pc + 1] for b in numbers])
        got = self._fetch_entries(ents, numbers)
        out = {}
        for b, e in zip(numbers, ents):
            out[b] = got[digest_of(e)] if e["length"] else bytes(self.root.chunk_length(b))
        return out

    def block_hashes(self) -> np.ndarray:
        """The xxh3-64 of every block, as the agent hashes its disk, from the index alone."""
        return np.concatenate([self.page(p)["xxh"] for p in range(self.root.page_count)]).astype(np.uint64)
