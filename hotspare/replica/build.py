"""A consolidation into chunks: plan a point, build its parts, write its root, commit.

1. :func:`plan_point`: the new point (the newest accepted cut after the current point), the
   source runs of every block the logs since the current point touch (from their metadata
   columns only: superseded bytes are never downloaded), and the previous root.
2. :meth:`PointBuild.jobs` and :func:`run_part`: each part job is a run of index pages. It
   reads its pages of the previous point, the log rows whose bytes survive, and, only for
   blocks a partial write merges with, the previous chunks; it writes new chunks into packs,
   create-only, deduplicated against the chunks of its pages, the disk-wide dedup index
   (:mod:`hotspare.replica.dedup`) and the job's own, and writes its new pages create-only. Jobs are self-contained, so mapped tasks run them on any worker.
3. :func:`finish_root`: the new root, the previous one with the new pages, pack counts and
   the dedup shards the new chunks touch, written create-only; :func:`commit_point` the catalog naming it.

Every object a build writes is under a key of the catalog version it builds and a random
token, so racing builds never overwrite each other, and a build that loses the commit race
(or crashes) leaves only garbage that :mod:`hotspare.replica.gc` removes.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache

import numpy as np
import xxhash

from hotspare import layout
from hotspare.catalog import AcceptedLog, Catalog, RecoveryPoint, catalog_logs
from hotspare.catalog.model import utcnow
from hotspare.consolidate.sources import KEEP, ZERO, BlockSources, RowData, RowRef, Sources, compute_sources
from hotspare.extentlog.schema import SECTOR
from hotspare.errors import InvalidObject
from hotspare.faults import crash_point
from hotspare.replica import dedup
from hotspare.replica.index import (
    PAGE_CHUNKS,
    IndexRoot,
    digest_of,
    PackRef,
    PageRef,
    page_bytes,
    page_ref,
    pack_id,
    read_root,
    root_bytes,
)
from hotspare.replica.packs import PACK_TARGET, PackWriter
from hotspare.replica.reader import ChunkReader
from hotspare.store.base import Store

JOB_BYTES = 64 << 20  # changed bytes per part job
FETCHES = 8  # requests a part job has in flight (page and row group reads, page writes)
PACK_UPLOADS = 2  # packs a part job uploads at once while it fills the next


@lru_cache(maxsize=8)
def _zeros(length: int) -> bytes:
    return bytes(length)


@dataclass
class PartJob:
    """What one worker needs to build a run of pages of a new point; no shared state."""

    machine: str
    disk: str
    version: int  # the catalog version the build commits
    directory: str  # where its index objects go
    disk_size: int
    chunk_size: int
    page_chunks: int
    pages: list[int]
    blocks: dict[int, BlockSources]  # the changed blocks of these pages
    rows: dict[int, RowRef]  # owner id -> row
    previous: IndexRoot | None  # the previous point's index (None: the disk was zeros)
    legacy_vhd: str | None = None  # converting: the previous content is this VHD object
    pack_target: int = PACK_TARGET


@dataclass
class PartResult:
    pages: dict[int, PageRef | None]  # None: the page became all zeros
    packs: dict[str, PackRef]  # written by the job
    refs: dict[str, int]  # change of each pack's entry count
    uploaded: int = 0
    chunks_written: int = 0
    chunks_deduplicated: int = 0
    chunks_zero: int = 0
    bytes_read: int = 0  # of logs and previous chunks
    new_chunks: np.ndarray = field(default_factory=lambda: dedup.rows([]))  # dedup.ROW of the chunks written


@dataclass
class PointBuild:
    machine: str
    disk: str
    disk_size: int
    chunk_size: int
    version: int
    token: str
    point_id: str
    epoch: int
    seq: int
    logs: list[AcceptedLog]
    sources: Sources
    previous: IndexRoot | None
    point_time: datetime
    consistent: bool
    legacy_vhd: str | None = None
    replaces: str | None = None  # converting the current point itself: its id
    results: list[PartResult] = field(default_factory=list)
    dedup_uploaded: int = 0  # bytes of the dedup shards finish_root wrote

    @property
    def directory(self) -> str:
        return layout.index_dir(self.machine, self.disk, self.point_id, self.version, self.token)

    def jobs(self, job_bytes: int | None = None) -> list[PartJob]:
        """The part jobs: runs of pages holding about ``job_bytes`` of changed blocks each."""
        job_bytes = job_bytes or JOB_BYTES
        pc = self.previous.page_chunks if self.previous else PAGE_CHUNKS
        by_page: dict[int, list[int]] = {}
        for b in sorted(self.sources.blocks):
            by_page.setdefault(b // pc, []).append(b)
        jobs: list[PartJob] = []
        size = 0
        for page, blocks in by_page.items():
            if not jobs or size + len(blocks) * self.chunk_size > job_bytes:
                jobs.append(PartJob(self.machine, self.disk, self.version, self.directory, self.disk_size,
                                    self.chunk_size, pc, [], {}, {}, self.previous, self.legacy_vhd))
                size = 0
            job = jobs[-1]
            job.pages.append(page)
            for b in blocks:
                src = self.sources.blocks[b]
                job.blocks[b] = src
                for o in src.owners:
                    job.rows[o] = self.sources.rows[o]
            size += len(blocks) * self.chunk_size
        return jobs


def current_root(store: Store, catalog: Catalog) -> IndexRoot | None:
    """The current point's root, after checking that every pack it names is in the store at
    its size (one listing, a request per thousand packs): a point built on a lost pack would
    carry the loss forward unseen."""
    cur = catalog.point("current")
    if cur is None or not cur.root:
        return None
    root = read_root(store, cur.root)
    sizes = {o.key: o.size for o in store.list(layout.packs_prefix(catalog.machine, catalog.disk))}
    for ref in root.packs.values():
        if ref.key not in sizes:
            raise InvalidObject(ref.key, f"pack missing from the store (point {cur.id} reads from it)")
        if sizes[ref.key] != ref.size:
            raise InvalidObject(ref.key, f"pack has {sizes[ref.key]} bytes, point {cur.id}'s index says {ref.size}")
    return root


def plan_point(store: Store, catalog: Catalog, chunk_size: int) -> PointBuild | None:
    """The build of a new current point, or None when no cut is newer than the current point
    (and the current point is already chunked)."""
    current = catalog.point("current")
    legacy = current is not None and not current.root
    after = current.position if current else (-1, -1)
    logs = catalog_logs(store, catalog, after=after)
    cuts = [lg for lg in logs if lg.cut]
    if not cuts and not legacy:
        return None  # points are made at cuts only: logs of an unfinished cycle wait for theirs
    newest = cuts[-1] if cuts else None
    new = [lg for lg in logs if newest is not None and lg.position <= newest.position]
    sources = compute_sources(store, [lg.key for lg in new], catalog.disk_size, chunk_size)
    previous = None if legacy else current_root(store, catalog)
    point_time = max((lg.accepted_at for lg in new), default=current.time if current else utcnow())
    if newest is not None:
        epoch, seq, consistent = newest.epoch, newest.last_seq, newest.consistent
    else:
        assert current is not None
        epoch, seq, consistent = current.epoch, current.seq, current.consistent
    build = PointBuild(catalog.machine, catalog.disk, catalog.disk_size, chunk_size, catalog.version + 1,
                       secrets.token_hex(4), f"{epoch}-{seq}", epoch, seq, new, sources, previous, point_time,
                       consistent)
    if legacy:
        from hotspare.replica.convert import legacy_blocks

        assert current is not None
        build.legacy_vhd = current.vhd
        build.replaces = current.id if newest is None else None
        legacy_blocks(store, build)
    return build


def _chunk(src: BlockSources, old: bytes | None, length: int, rows: dict[int, RowRef], data: RowData,
           chunk_size: int) -> bytearray:
    """The final bytes of a changed block; ``old``: its previous content (None: zeros)."""
    out = bytearray(chunk_size)
    if old is not None and src.needs_previous:
        out[:len(old)] = old
    base = src.index * chunk_size
    for owner, s0, n in src.runs:
        a, b = s0 * SECTOR, (s0 + n) * SECTOR
        if owner == ZERO:
            out[a:b] = bytes(b - a)
        elif owner != KEEP:
            ref = rows[owner]
            at = base + a - ref.offset
            out[a:b] = data.data(ref)[at:at + (b - a)]
    del out[length:]
    return out


def _previous_chunks(store: Store, job: PartJob, reader: ChunkReader, blocks: list[int]) -> dict[int, bytes]:
    """The previous content of ``blocks`` (the ones a partial write merges with)."""
    if not blocks:
        return {}
    if job.legacy_vhd is not None:
        from hotspare.replica.convert import read_legacy

        return read_legacy(store, job.legacy_vhd, blocks, job.chunk_size, job.disk_size)
    if job.previous is None:
        return {}
    return reader.blocks(blocks)


def run_part(store: Store, job: PartJob) -> PartResult:
    """Build and write the chunks and pages of ``job``. Its reads (previous pages, log row
    groups) run at once on a pool, and full packs upload while the next one fills: a job
    waits for round trips once, not once per object."""
    with ThreadPoolExecutor(FETCHES) as reads, ThreadPoolExecutor(PACK_UPLOADS) as uploads:
        return _build_part(store, job, reads, uploads)


def _build_part(store: Store, job: PartJob, reads: ThreadPoolExecutor, uploads: ThreadPoolExecutor) -> PartResult:
    root = job.previous or IndexRoot(machine=job.machine, disk=job.disk, point="", disk_size=job.disk_size,
                                     chunk_size=job.chunk_size, page_chunks=job.page_chunks)
    prev = ChunkReader(store, root, readahead=0)
    pages = {page: reads.submit(prev.page, page) for page in job.pages}
    data = RowData(store)
    data.prefetch(reads, job.rows.values())
    packs = PackWriter(store, job.machine, job.disk, job.version, target=job.pack_target, uploader=uploads)
    res = PartResult(pages={}, packs={}, refs={})
    refs: Counter[int] = Counter()
    bodies: dict[int, bytes | None] = {}
    olds: dict[int, np.ndarray] = {page: f.result() for page, f in pages.items()}  # now in the reader's cache
    old_chunks = _previous_chunks(store, job, prev, [b for b, s in job.blocks.items() if s.needs_previous])
    res.bytes_read += sum(len(c) for c in old_chunks.values())
    # Where this point can read a chunk of a given digest: the chunks of its pages first, then
    # the disk-wide dedup index for the rest, then the chunks this job writes.
    known: dict[bytes, tuple[int, int, int]] = {}
    news: dict[int, np.ndarray] = {}
    todo: list[tuple[np.ndarray, int, bytes, bytearray]] = []  # (page entries, index, digest, chunk)
    for page in job.pages:
        old = olds[page]
        new = news[page] = old.copy()
        first = page * job.page_chunks
        for b in sorted(b for b in job.blocks if b // job.page_chunks == page):
            length = root.chunk_length(b)
            chunk = _chunk(job.blocks[b], old_chunks.get(b), length, job.rows, data, job.chunk_size)
            e = new[b - first]
            e["xxh"] = xxhash.xxh3_64_intdigest(chunk)
            if chunk == _zeros(len(chunk)):  # memcmp: several times faster than numpy's any() on bytes
                e["digest"], e["pack"], e["offset"], e["length"] = b"", 0, 0, 0
                res.chunks_zero += 1
                continue
            todo.append((new, b - first, hashlib.sha256(chunk).digest(), chunk))
    # Only the pages' entries that hold a wanted digest become Python objects (numpy finds
    # them): a job's pages hold up to 1,024 entries each, its new chunks far fewer.
    want = {t[2] for t in todo}
    if job.pages and want:
        live = np.concatenate([olds[p][olds[p]["length"] > 0] for p in job.pages])
        heads = dedup.prefix(np.array(sorted(want), dtype="S32"))
        for e in live[np.isin(dedup.prefix(live["digest"]), heads)]:  # candidates: compare whole digests
            if (d := digest_of(e)) in want:
                known.setdefault(d, (int(e["pack"]), int(e["offset"]), int(e["length"])))
    for d, where in dedup.lookup(store, job.previous, sorted({t[2] for t in todo} - known.keys())).items():
        known.setdefault(d, where)
    new_chunks: list[tuple[bytes, int, int, int]] = []
    for entries, i, digest, chunk in todo:
        where = known.get(digest)
        if where is None:
            pid, at = packs.add(digest, chunk)
            where = known[digest] = (pid, at, len(chunk))
            new_chunks.append((digest, *where))
            res.chunks_written += 1
        else:
            res.chunks_deduplicated += 1
        e = entries[i]
        e["digest"], (e["pack"], e["offset"], e["length"]) = digest, where
    res.new_chunks = dedup.rows(new_chunks)
    for page in job.pages:
        old, new = olds[page], news[page]
        for p, n in zip(*np.unique(old["pack"][old["length"] > 0], return_counts=True)):
            refs[int(p)] -= int(n)
        for p, n in zip(*np.unique(new["pack"][new["length"] > 0], return_counts=True)):
            refs[int(p)] += int(n)
        bodies[page] = page_bytes(page, new) if new["length"].any() else None
    packs.wait()  # before the pages: a page never names a pack that is not in the store

    def put_page(page: int, body: bytes) -> tuple[int, PageRef]:
        key = layout.index_page_key(job.directory, page)
        store.put(key, body, create_only=True)
        return page, page_ref(key, body)

    # Pages are small objects: written one at a time, a job of 64 pages waits for 64 round
    # trips; the read pool's threads overlap them.
    stored = [(p, body) for p, body in bodies.items() if body is not None]
    written = dict(reads.map(lambda item: put_page(*item), stored))
    for page, body in bodies.items():
        res.pages[page] = written[page] if body is not None else None
        res.uploaded += len(body) if body is not None else 0
    res.packs = packs.written
    res.uploaded += packs.uploaded
    res.refs = {pack_id(p): n for p, n in refs.items() if n}
    res.bytes_read += data.bytes_read
    return res


def finish_root(store: Store, build: PointBuild, results: list[PartResult]) -> tuple[str, IndexRoot]:
    """Write the new point's root, create-only; returns its key and the root."""
    prev = build.previous
    root = IndexRoot(machine=build.machine, disk=build.disk, point=build.point_id, disk_size=build.disk_size,
                     chunk_size=build.chunk_size, page_chunks=prev.page_chunks if prev else PAGE_CHUNKS,
                     pages=dict(prev.pages) if prev else {}, packs={k: v.model_copy() for k, v in (prev.packs if prev else {}).items()})
    for r in results:
        for page, ref in r.pages.items():
            if ref is None:
                root.pages.pop(page, None)
            else:
                root.pages[page] = ref
        root.packs.update({k: v.model_copy() for k, v in r.packs.items()})
    for r in results:
        for pid, n in r.refs.items():
            root.packs[pid].refs += n
    root.packs = {k: v for k, v in root.packs.items() if v.refs > 0}
    new = np.concatenate([r.new_chunks for r in results]) if results else dedup.rows([])
    build.dedup_uploaded = dedup.update(store, build.directory, prev, root, new)
    key = layout.index_root_key(build.directory)
    crash_point("consolidate-before-root")
    store.put(key, root_bytes(root), create_only=True)
    return key, root


def commit_point(catalog: Catalog, build: PointBuild, root_key: str) -> Catalog:
    """The next catalog: the built point becomes current."""
    point = RecoveryPoint(id=build.point_id, epoch=build.epoch, seq=build.seq, time=build.point_time, root=root_key,
                          bytes_applied=build.sources.applied_bytes, consistent=build.consistent)
    if build.legacy_vhd is not None:
        # Converted: the VHD points are gone with their VHDs; this point is the first chunked one.
        return catalog.next(points=[point], vhd={})
    return catalog.next(points=[*catalog.points, point])


def run_build(store: Store, build: PointBuild, run_jobs=None) -> tuple[str, IndexRoot]:
    """Build in this process (or through ``run_jobs``, which maps jobs to results), write the root."""
    jobs = build.jobs()
    results = run_jobs(jobs) if run_jobs else [run_part(store, j) for j in jobs]
    build.results = results
    return finish_root(store, build, results)
