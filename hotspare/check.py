"""The store check: prove that a store is whole, as restic's ``check`` does, and report every
finding, not only the first.

Terms:
- finding: one fault of one object, named by its key, with a one-line reason and a
  severity: ``damaged`` (data or history is lost or wrong; no hotspare command restores it),
  ``repairable`` (harmless now, and a command removes it: garbage, which every
  ``hotspare consolidate MACHINE`` sweeps), ``warning`` (worth a look, nothing at risk).
- metadata: catalog and state versions, manifests, index roots and pages, the packs' sizes
  and tables of contents, the extent logs' footers and their seq/offset/length columns.
  A check always reads all of it (a few KB per 64 MiB of disk written, plus the history).
- data: the chunks in packs and the data column of the logs. Read only with
  ``read_data`` (a fraction of the packs and logs, chosen at random, or all of them): then
  every chunk's SHA-256 and every row's xxh3 checksum are verified.

What is proved, per machine (see DESIGN.md, The store, Replica):
1. every state version and catalog version parses, names its own machine (and disk, disk
   size) and version, and the versions run 1..N without a gap;
2. every object the newest catalog names exists at its size: manifests (size and SHA-256),
   accepted logs, index roots, index pages (their SHA-256 in the root), packs (their size
   in the root), VHD objects;
3. every index entry is sound (its pack named by the root, offset and length inside the
   pack's data area and equal to a row of the pack's table of contents, the length its
   block's) and every zero entry is a plain zero (length 0, no pack, no digest);
4. every accepted log's metadata agrees with the catalog, and with data read its rows match
   their checksums;
5. nothing in ``quarantine/`` is a log the catalog names as accepted;
6. garbage (an object no retained point or catalog references, written for a committed
   version) is reported as repairable, never as damage.

The costs: one listing per disk and per chain, one GET per catalog and state version (read
eight at a time), per manifest, per page and per root, two ranged GETs per pack (trailer,
table of contents) and a few per log (footer, metadata columns); data only with
``read_data``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from hotspare import layout
from hotspare.catalog import AcceptedLog, Catalog
from hotspare.catalog.manifest import load_manifest
from hotspare.errors import InvalidLog, InvalidObject, NotFound, UsageError
from hotspare.extentlog.reader import (
    open_parquet,
    read_log_info,
    read_row_group,
    validate_log,
)
from hotspare.extentlog.schema import SECTOR
from hotspare.ingest import epoch_of
from hotspare.layout import num
from hotspare.machine import DiskSpec, list_machines, load_machine
from hotspare.replica.dedup import read_shard
from hotspare.replica.index import IndexRoot, pack_id, read_page, read_root
from hotspare.replica.packs import TOC, TRAILER, read_toc
from hotspare.state import MachineState
from hotspare.store.base import Store
from hotspare.versioned import load

Severity = Literal["damaged", "repairable", "warning"]
SEVERITIES: tuple[Severity, ...] = ("damaged", "repairable", "warning")
EXIT_CODES = {"clean": 0, "repairable": 1, "damaged": 2}
READ_WORKERS = 8  # versions read at once: on S3 each is a GET, so overlap their latency
DATA_READ = 16 << 20  # bytes of a pack's data read per request with read_data
EXAMPLES = 3  # blocks named in a finding's reason (all of them are in ``blocks``)
META_COLUMNS = ["seq", "offset", "length"]


class Finding(BaseModel):
    severity: Severity
    key: str = Field(description="the object at fault")
    reason: str = Field(description="one line")
    machine: str = ""
    disk: str = ""
    points: list[str] = Field(default_factory=list, description="the retained points that use the object")
    blocks: list[int] = Field(default_factory=list, description="for a bad chunk: the blocks that read it")
    offset: int | None = Field(None, description="for a bad chunk: its offset in the pack")
    repair: str = Field("", description="what repairs it, when something does")

    def line(self) -> str:
        return f"{self.severity}: {self.key}: {self.reason}"


class CheckReport(BaseModel):
    machines: list[str] = Field(default_factory=list)
    findings: list[Finding] = Field(default_factory=list)
    objects: int = Field(0, description="objects checked")
    packs: int = Field(0, description="packs whose table of contents was read")
    packs_read: int = Field(0, description="packs whose data was read and hashed")
    chunks_verified: int = 0
    logs: int = 0
    logs_read: int = Field(0, description="logs whose data was read and checksummed")
    read_data: float = 0.0

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self.findings if f.severity == severity)

    @property
    def verdict(self) -> Literal["clean", "repairable", "damaged"]:
        if self.count("damaged"):
            return "damaged"
        return "repairable" if self.count("repairable") else "clean"

    @property
    def exit_code(self) -> int:
        """0 clean (warnings allowed), 1 repairable findings only, 2 damaged."""
        return EXIT_CODES[self.verdict]

    def summary(self) -> str:
        data = (f"read the data of {self.packs_read} pack(s) ({self.chunks_verified} chunks) and "
                f"{self.logs_read} log(s)") if self.read_data else "metadata only (no data read)"
        found = ", ".join(f"{self.count(s)} {s}" for s in SEVERITIES)
        return (f"{self.verdict}: checked {len(self.machines)} machine(s), {self.objects} object(s), "
                f"{self.packs} pack(s), {self.logs} log(s); {data}; {found}")


GARBAGE_REPAIR = "hotspare consolidate {machine} (every consolidation collects garbage)"


def parse_fraction(text: str | None) -> float:
    """``--read-data[=FRACTION]``: None is 0 (no data), ``""`` or ``"1"`` all, ``0.1`` or ``10%``
    a tenth of the packs and logs, chosen at random."""
    if text is None:
        return 0.0
    t = text.strip()
    if not t:
        return 1.0
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise UsageError(f"--read-data={text}: give a fraction in (0, 1] or a percentage such as 10%")
    return value


def check_store(store: Store, machine: str | None = None, *, read_data: float = 0.0,
                rng: random.Random | None = None, say: Callable[[str], None] | None = None) -> CheckReport:
    """Check ``machine`` (every machine of the store when None) and the quarantine; returns
    every finding. ``read_data``: the fraction of packs and logs whose data is read (0: none).
    Raises UsageError for a machine that is not protected, StoreError when the store fails."""
    if not 0 <= read_data <= 1:
        raise UsageError(f"read_data {read_data}: give a fraction from 0 to 1")
    if machine is not None:
        layout.check_name("machine", machine)
        if not store.exists(layout.machine_key(machine)):
            raise UsageError(f"machine {machine!r} is not protected in {store.url}")
    c = _Checker(store, read_data, rng or random.Random(), say or (lambda s: None))
    c.report.machines = [machine] if machine else sorted(list_machines(store))
    for m in c.report.machines:
        c.machine(m)
    c.quarantine(machine)
    return c.report


@dataclass
class _Disk:
    """What the check of one disk learns, for the later steps."""

    machine: str
    spec: DiskSpec
    objects: dict[str, int]  # every object under the disk's prefix -> size
    catalog: Catalog | None = None
    accepted: set[str] = field(default_factory=set)
    roots: dict[str, IndexRoot] = field(default_factory=dict)  # point id -> its root
    referenced: set[str] = field(default_factory=set)  # keys the catalog and retained points use
    unknown_refs: bool = False  # a root is damaged: what its point references is not known


class _Checker:
    def __init__(self, store: Store, read_data: float, rng: random.Random, say: Callable[[str], None]) -> None:
        self.store, self.read_data, self.rng, self.say = store, read_data, rng, say
        self.report = CheckReport(read_data=read_data)
        self.accepted: dict[str, tuple[str, str, int]] = {}  # accepted log -> (machine, disk, catalog version)

    def find(self, severity: Severity, key: str, reason: str, **more) -> None:
        self.report.findings.append(Finding(severity=severity, key=key, reason=reason, **more))

    def picked(self, items: Iterable[str]) -> set[str]:
        """The items whose data is read: a random ``read_data`` fraction (at least one)."""
        items = sorted(items)
        if not self.read_data or not items:
            return set()
        k = min(len(items), max(1, math.ceil(self.read_data * len(items))))
        return set(self.rng.sample(items, k))

    # -- machines and version chains ------------------------------------------------------

    def machine(self, m: str) -> None:
        self.say(f"checking machine {m}")
        self.chain(layout.state_prefix(m), {o.key: o.size for o in self.store.list(layout.state_prefix(m))},
                   MachineState, lambda s: None if s.machine == m else f"names machine {s.machine!r}, expected {m!r}",
                   m, "")
        try:
            cfg = load_machine(self.store, m)
        except (InvalidObject, UsageError) as err:
            self.find("damaged", layout.machine_key(m), f"registration does not parse: {getattr(err, 'reason', err)}",
                      machine=m)
            return
        self.report.objects += 1
        # One listing of every disk's objects (logs, catalog, packs, index, VHD objects).
        prefix = f"{layout.machine_prefix(m)}disks/"
        by_disk: dict[str, dict[str, int]] = defaultdict(dict)
        for o in self.store.list(prefix):
            by_disk[o.key[len(prefix):].split("/", 1)[0]][o.key] = o.size
        for name in sorted(set(by_disk) - {d.name for d in cfg.disks}):
            self.find("warning", f"{prefix}{name}/", f"objects of a disk {m}'s registration does not name",
                      machine=m, disk=name)
        for spec in cfg.disks:
            self.disk(m, spec, by_disk.get(spec.name, {}))

    def chain(self, prefix: str, objects: dict[str, int], model, verify: Callable[[object], str | None],
              m: str, d: str):
        """Check the version chain under ``prefix``; returns its newest version that parses
        (and which version is the newest) or (None, 0)."""
        versions: dict[int, str] = {}
        for key in objects:
            rest = key[len(prefix):]
            if not key.startswith(prefix) or "/" in rest or rest == "HEAD":
                continue
            v = layout.version_of(key)
            if v is None or v == 0:
                self.find("warning", key, "not a version of the chain (<20 digits from 1>.json)", machine=m, disk=d)
            else:
                versions[v] = key
        if not versions:
            return None, 0
        newest = max(versions)
        for v in range(1, newest + 1):
            if v not in versions:
                self.find("damaged", f"{prefix}{num(v)}.json", f"missing: a gap in the chain (versions must run "
                                                              f"1..{newest} without one)", machine=m, disk=d)

        def one(v: int):
            try:
                return v, load(self.store, prefix, v, model), None
            except InvalidObject as err:
                return v, None, err.reason
            except NotFound:
                return v, None, "missing: listed, then gone"
            except ValueError as err:  # bytes that are not UTF-8 JSON at all
                return v, None, f"does not parse: {err}"

        best = None
        with ThreadPoolExecutor(READ_WORKERS, thread_name_prefix="hotspare-check") as pool:
            for v, obj, why in pool.map(one, sorted(versions)):
                self.report.objects += 1
                if obj is not None:
                    why = verify(obj)
                if why is not None:
                    self.find("damaged", versions[v], f"version {v} does not parse or chain: {why}", machine=m, disk=d)
                    continue
                best = obj
        return best, newest

    # -- a disk ---------------------------------------------------------------------------

    def disk(self, m: str, spec: DiskSpec, objects: dict[str, int]) -> None:
        dk = _Disk(m, spec, objects)

        def verify(c: Catalog) -> str | None:
            if (c.machine, c.disk) != (m, spec.name):
                return f"belongs to {c.machine}/{c.disk}, not {m}/{spec.name}"
            if c.disk_size != spec.size:
                return f"disk size {c.disk_size}, the registration says {spec.size}"
            return None

        cat, newest = self.chain(layout.catalog_prefix(m, spec.name), objects, Catalog, verify, m, spec.name)
        if cat is None:
            return
        if cat.version != newest:
            self.find("warning", layout.catalog_key(m, spec.name, cat.version),
                      f"the newest catalog (v{newest}) is damaged: the rest of {m}/{spec.name} is checked "
                      f"against v{cat.version}", machine=m, disk=spec.name)
        dk.catalog = cat
        self.logs(dk)
        self.points(dk)
        self.garbage(dk)

    def missing_or_size(self, dk: _Disk, key: str, size: int | None, what: str, **more) -> bool:
        """False (and a finding) when ``key`` is not in the disk's listing at ``size``."""
        self.report.objects += 1
        got = dk.objects.get(key)
        if got is None:
            self.find("damaged", key, f"missing: {what}", machine=dk.machine, disk=dk.spec.name, **more)
            return False
        if size is not None and got != size:
            self.find("damaged", key, f"{'truncated' if got < size else 'grown'}: {got} bytes, expected {size} ({what})",
                      machine=dk.machine, disk=dk.spec.name, **more)
            return False
        return True

    # -- accepted logs ----------------------------------------------------------------------

    def logs(self, dk: _Disk) -> None:
        cat = dk.catalog
        assert cat is not None
        logs: list[AcceptedLog] = []
        for ref in cat.manifests:
            dk.referenced.add(ref.key)
            self.report.objects += 1
            try:
                logs.extend(load_manifest(self.store, ref, dk.machine, dk.spec.name))
            except InvalidObject as err:
                self.find("damaged", err.key, f"manifest of catalog v{cat.version}: {err.reason}",
                          machine=dk.machine, disk=dk.spec.name)
        logs.extend(cat.tail)
        read = self.picked(lg.key for lg in logs)
        for lg in logs:
            dk.accepted.add(lg.key)
            dk.referenced.add(lg.key)
            self.accepted[lg.key] = (dk.machine, dk.spec.name, cat.version)
            what = f"accepted log (epoch {lg.epoch}, seqs {lg.first_seq}..{lg.last_seq}) of catalog v{cat.version}"
            if not self.missing_or_size(dk, lg.key, lg.size, what):
                continue
            self.report.logs += 1
            try:
                self.log(dk, lg, lg.key in read)
            except InvalidLog as err:
                self.find("damaged", lg.key, f"{what}: {err.detail}", machine=dk.machine, disk=dk.spec.name)
            except InvalidObject as err:
                self.find("damaged", lg.key, f"{what}: {err.reason}", machine=dk.machine, disk=dk.spec.name)

    def log(self, dk: _Disk, lg: AcceptedLog, read: bool) -> None:
        key, size = lg.key, dk.spec.size
        if read:
            with self.store.open(key) as f:
                info = validate_log(f, key, machine=dk.machine, disk=dk.spec.name, epoch=lg.epoch, disk_size=size)
            self.report.logs_read += 1
            meta, rows = info.meta, info.rows
        else:
            # A small buffer: a log's data column is never read, only its footer and the
            # metadata columns (a few bytes per row).
            with self.store.open(key, buffer_size=64 << 10) as f:
                meta = read_log_info(f, key)
                f.seek(0)
                pf = open_parquet(f, key)
                rows = pf.metadata.num_rows
                for field_, want in (("machine", dk.machine), ("disk", dk.spec.name), ("epoch", lg.epoch),
                                     ("disk_size", size)):
                    if getattr(meta, field_) != want:
                        raise InvalidLog(key, f"metadata {field_} is {getattr(meta, field_)!r}, expected {want!r}")
                nxt = meta.first_seq
                for g in range(pf.num_row_groups):
                    table, row0 = read_row_group(pf, key, g, META_COLUMNS)
                    seq = table.column("seq").to_numpy()
                    off = table.column("offset").to_numpy().astype(np.uint64)
                    ln = table.column("length").to_numpy().astype(np.uint64)
                    bad = seq != np.arange(nxt, nxt + len(seq), dtype=np.uint64)
                    bad |= (off % SECTOR != 0) | (ln % SECTOR != 0) | (ln == 0) | (ln > size) | (off > size - ln)
                    if bad.any():
                        i = int(np.argmax(bad))
                        raise InvalidLog(key, f"seq {seq[i]}, extent {off[i]}+{ln[i]}: not the next seq or not "
                                              f"a sector-aligned extent inside the disk", row0 + i)
                    nxt += len(seq)
        if (meta.first_seq, meta.last_seq, rows) != (lg.first_seq, lg.last_seq, lg.rows):
            raise InvalidLog(key, f"holds seqs {meta.first_seq}..{meta.last_seq} in {rows} rows, the catalog "
                                  f"says {lg.first_seq}..{lg.last_seq} in {lg.rows}")

    # -- points: roots, pages, packs --------------------------------------------------------

    def points(self, dk: _Disk) -> None:
        cat = dk.catalog
        assert cat is not None
        m, d = dk.machine, dk.spec.name
        for key in {*cat.vhd_objects.values(), *cat.vhd.values(), *(p.vhd for p in cat.points if p.vhd)}:
            dk.referenced.add(key)
            self.missing_or_size(dk, key, None, f"VHD object named by catalog v{cat.version}")
        for p in cat.points:
            if not p.root:
                continue
            dk.referenced.add(p.root)
            self.report.objects += 1
            try:
                root = read_root(self.store, p.root)
            except InvalidObject as err:
                self.find("damaged", err.key, f"index root of point {p.id}: {err.reason}", machine=m, disk=d,
                          points=[p.id])
                dk.unknown_refs = True
                continue
            want = (m, d, p.id, cat.disk_size, dk.spec.block_size)
            got = (root.machine, root.disk, root.point, root.disk_size, root.chunk_size)
            if got != want:
                self.find("damaged", p.root, f"index root of point {p.id} is of {'/'.join(map(str, got[:3]))} "
                                             f"({got[3]} bytes in chunks of {got[4]}), expected "
                                             f"{'/'.join(map(str, want[:3]))} ({want[3]} in chunks of {want[4]})",
                          machine=m, disk=d, points=[p.id])
                dk.unknown_refs = True
                continue
            dk.roots[p.id] = root
        packs = self.packs(dk)
        self.pages(dk, packs)
        self.shards(dk)

    def packs(self, dk: _Disk) -> dict[str, np.ndarray | None]:
        """Each pack the retained roots name -> its table of contents (None when damaged)."""
        users: dict[str, list[str]] = defaultdict(list)
        sizes: dict[str, set[int]] = defaultdict(set)
        chunks: dict[str, set[int]] = defaultdict(set)
        for pid, root in dk.roots.items():
            for ref in root.packs.values():
                users[ref.key].append(pid)
                sizes[ref.key].add(ref.size)
                chunks[ref.key].add(ref.chunks)
        out: dict[str, np.ndarray | None] = {}
        for key, pts in users.items():
            dk.referenced.add(key)
            out[key] = None
            if len(sizes[key]) > 1:
                self.find("damaged", key, f"the roots of points {', '.join(pts)} disagree on its size "
                                          f"({sorted(sizes[key])})", machine=dk.machine, disk=dk.spec.name, points=pts)
                continue
            [size] = sizes[key]
            if not self.missing_or_size(dk, key, size, f"pack of point(s) {', '.join(pts)}", points=pts):
                continue
            self.report.packs += 1
            try:
                toc = read_toc(self.store, key)
            except InvalidObject as err:
                self.find("damaged", key, f"pack of point(s) {', '.join(pts)}: {err.reason}",
                          machine=dk.machine, disk=dk.spec.name, points=pts)
                continue
            why = _toc_fault(toc, size - TRAILER - len(toc) * TOC.itemsize, chunks[key])
            if why:
                self.find("damaged", key, f"pack of point(s) {', '.join(pts)}: {why}", machine=dk.machine,
                          disk=dk.spec.name, points=pts)
                continue
            out[key] = toc
        read = self.picked(k for k, toc in out.items() if toc is not None)
        for key in sorted(read):
            self.pack_data(dk, key, out[key], users[key])  # type: ignore[arg-type]
        return out

    def pack_data(self, dk: _Disk, key: str, toc: np.ndarray, pts: list[str]) -> None:
        """Read the pack's chunks and check each one's SHA-256 against its table of contents."""
        self.say(f"reading pack {key}")
        self.report.packs_read += 1
        i, n = 0, len(toc)
        bad: list[tuple[int, int, str]] = []
        while i < n:
            start = int(toc[i]["offset"])
            j = i
            while j < n and int(toc[j]["offset"]) + int(toc[j]["length"]) - start <= max(DATA_READ, int(toc[i]["length"])):
                j += 1
            end = int(toc[j - 1]["offset"]) + int(toc[j - 1]["length"])
            data = memoryview(self.store.get_range(key, start, end - start))
            for row in toc[i:j]:
                a, ln = int(row["offset"]) - start, int(row["length"])
                chunk = data[a:a + ln]
                self.report.chunks_verified += 1
                if len(chunk) != ln:
                    bad.append((int(row["offset"]), ln, "ends past the pack's data"))
                elif hashlib.sha256(chunk).digest() != bytes(row["digest"]).ljust(32, b"\0"):
                    bad.append((int(row["offset"]), ln, "fails its SHA-256"))
            i = j
        if bad:
            self.bad_chunks(dk, key, bad)

    def bad_chunks(self, dk: _Disk, key: str, bad: list[tuple[int, int, str]]) -> None:
        """A finding per bad chunk, naming the blocks and the points that read it (the pages
        are read again: only when a pack is damaged)."""
        offsets = np.array([b[0] for b in bad], dtype=np.uint64)
        use: dict[int, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        unknown: set[str] = set()  # points naming the pack with a page that could not be read
        for point, root in dk.roots.items():
            pid = next((int(k, 16) for k, ref in root.packs.items() if ref.key == key), None)
            if pid is None:
                continue
            for n in sorted(root.pages):
                try:
                    ents = read_page(self.store, root, n)
                except InvalidObject:
                    unknown.add(point)  # the page is reported with the pages
                    continue
                hit = np.flatnonzero((ents["length"] > 0) & (ents["pack"] == pid) & np.isin(ents["offset"], offsets))
                for i in hit.tolist():
                    use[int(ents[i]["offset"])][point].append(n * root.page_chunks + i)
        for offset, length, why in bad:
            by_point = use.get(offset, {})
            blocks = sorted({b for bs in by_point.values() for b in bs})
            pts = sorted(set(by_point) | unknown)
            if not pts:
                self.find("warning", key, f"chunk at byte {offset} ({length} bytes) {why}; no retained point reads it",
                          machine=dk.machine, disk=dk.spec.name, offset=offset)
                continue
            users = f"block(s) {_few(blocks)} of point(s) {', '.join(sorted(by_point))} read it" if blocks else ""
            if unknown:
                users += ("; " if users else "") + (f"point(s) {', '.join(sorted(unknown))} may read it{' too' if users else ''} "
                                                    "(an index page of theirs is damaged)")
            self.find("damaged", key, f"chunk at byte {offset} ({length} bytes) {why}: {users}",
                      machine=dk.machine, disk=dk.spec.name, points=pts, blocks=blocks, offset=offset)

    def pages(self, dk: _Disk, tocs: dict[str, np.ndarray | None]) -> None:
        users: dict[str, list[tuple[str, int]]] = defaultdict(list)  # page key -> (point, page number)
        for point, root in dk.roots.items():
            for n, ref in root.pages.items():
                users[ref.key].append((point, n))
        counts: dict[str, dict[str, int]] = {}  # page key -> entries per pack id
        for key, uses in users.items():
            dk.referenced.add(key)
            pts = sorted({p for p, _ in uses})
            point, n = uses[0]
            root = dk.roots[point]
            if not self.missing_or_size(dk, key, None, f"index page {n} of point(s) {', '.join(pts)}", points=pts):
                continue
            try:
                ents = read_page(self.store, root, n)
            except InvalidObject as err:
                self.find("damaged", key, f"index page {n} of point(s) {', '.join(pts)}: {err.reason}",
                          machine=dk.machine, disk=dk.spec.name, points=pts)
                continue
            for p2, n2 in uses[1:]:
                if n2 != n or dk.roots[p2].page_chunks != root.page_chunks:
                    self.find("damaged", key, f"used as page {n2} by point {p2} and as page {n} by point {point}",
                              machine=dk.machine, disk=dk.spec.name, points=pts)
            counts[key] = self.entries(dk, key, root, n, ents, tocs, pts)
        for point, root in dk.roots.items():
            got: dict[str, int] = defaultdict(int)
            for ref in root.pages.values():
                for pid, k in counts.get(ref.key, {}).items():
                    got[pid] += k
            if any(ref.key not in counts for ref in root.pages.values()):
                continue  # a damaged page: its counts are unknown
            for pid, ref in root.packs.items():
                if got.get(pid, 0) != ref.refs:
                    self.find("damaged", _root_key(dk, point),
                              f"index root of point {point} says {ref.refs} entries read pack {pid}, its pages "
                              f"hold {got.get(pid, 0)}", machine=dk.machine, disk=dk.spec.name, points=[point])

    def shards(self, dk: _Disk) -> None:
        """The dedup index's shards: a bad one loses only deduplication (a build treats it as
        empty), so it is a warning."""
        users: dict[tuple[str, int], list[str]] = defaultdict(list)  # (key, shard) -> points
        for point, root in dk.roots.items():
            for n, ref in root.dedup.items():
                users[(ref.key, n)].append(point)
        for (key, n), pts in users.items():
            dk.referenced.add(key)
            self.report.objects += 1
            root = dk.roots[pts[0]]
            try:
                read_shard(self.store, root, n)
            except InvalidObject as err:
                self.find("warning", key, f"dedup shard {n} of point(s) {', '.join(pts)}: {err.reason}; "
                                          "consolidation treats it as empty (only deduplication is lost)",
                          machine=dk.machine, disk=dk.spec.name, points=pts)

    def entries(self, dk: _Disk, key: str, root: IndexRoot, n: int, ents: np.ndarray,
                tocs: dict[str, np.ndarray | None], pts: list[str]) -> dict[str, int]:
        """Check the entries of page ``n``; returns the entries per pack id."""
        first = n * root.page_chunks
        blocks = np.arange(first, first + len(ents))
        faults: dict[str, list[int]] = defaultdict(list)
        zero = ents["length"] == 0
        bad_zero = (ents["pack"][zero] != 0) | (ents["offset"][zero] != 0) | (ents["digest"][zero] != b"")
        faults["zero entries name a pack, an offset or a digest"] += blocks[zero][bad_zero].tolist()
        want_len = np.minimum(root.chunk_size, root.disk_size - blocks * root.chunk_size)
        nz = ~zero
        faults[f"lengths differ from their blocks' (chunk size {root.chunk_size})"] += \
            blocks[nz & (ents["length"] != want_len)].tolist()
        counts: dict[str, int] = {}
        for p, k in zip(*np.unique(ents["pack"][nz], return_counts=True)):
            pid = pack_id(int(p))
            counts[pid] = int(k)
            mine = nz & (ents["pack"] == p)
            ref = root.packs.get(pid)
            if ref is None:
                faults[f"read from pack {pid}, which the index root does not name"] += blocks[mine].tolist()
                continue
            toc = tocs.get(ref.key)
            if toc is None:
                continue  # the pack itself is reported
            data_end = ref.size - TRAILER - len(toc) * TOC.itemsize
            off = ents["offset"][mine].astype(np.uint64)
            ln = ents["length"][mine].astype(np.uint64)
            outside = off + ln > data_end
            faults[f"read past the data area of {ref.key} ({data_end} bytes)"] += blocks[mine][outside].tolist()
            at = np.searchsorted(toc["offset"], off)
            found = at < len(toc)
            atc = np.minimum(at, len(toc) - 1)
            agree = found & (toc["offset"][atc] == off) & (toc["length"][atc] == ln) & \
                (toc["digest"][atc] == ents["digest"][mine])
            faults[f"disagree with the table of contents of {ref.key}"] += blocks[mine][~agree & ~outside].tolist()
        for why, bad in faults.items():
            if bad:
                self.find("damaged", key, f"index page {n} of point(s) {', '.join(pts)}: block(s) {_few(bad)} {why}",
                          machine=dk.machine, disk=dk.spec.name, points=pts, blocks=sorted(bad))
        return counts

    # -- garbage ------------------------------------------------------------------------------

    def garbage(self, dk: _Disk) -> None:
        cat = dk.catalog
        assert cat is not None
        m, d = dk.machine, dk.spec.name
        repair = GARBAGE_REPAIR.format(machine=m)
        catalogs = layout.catalog_prefix(m, d)
        manifests = layout.manifests_prefix(m, d)
        epochs = f"{layout.disk_prefix(m, d)}epochs/"
        kinds = ((layout.packs_prefix(m, d), "pack"), (layout.index_prefix(m, d), "index object"),
                 (layout.vhd_prefix(m, d), "VHD object"))
        for key, size in dk.objects.items():
            if key in dk.referenced:
                continue
            if key.startswith(manifests):
                v = layout.manifest_version(key)
                if v is not None and v <= cat.version:
                    self.find("repairable", key, f"garbage: a manifest catalog v{cat.version} does not name "
                                                 f"({size} bytes)", machine=m, disk=d, repair=repair)
                elif v is None:
                    self.find("warning", key, "not a manifest's name", machine=m, disk=d)
                continue
            if key.startswith(catalogs):
                continue  # the chain's
            if key.startswith(epochs):
                seqs = layout.parse_log_name(key)
                epoch = epoch_of(key)
                if seqs is None or epoch is None:
                    self.find("warning", key, "not an extent log's name", machine=m, disk=d)
                elif seqs[1] <= cat.folded.get(epoch, -1):
                    self.find("repairable", key, f"garbage: a log folded into the base point ({size} bytes)",
                              machine=m, disk=d, repair=repair)
                # else: a log not ingested yet
                continue
            kind = next((k for prefix, k in kinds if key.startswith(prefix)), None)
            if kind is None:
                self.find("warning", key, f"not an object of hotspare's layout for {m}/{d}", machine=m, disk=d)
                continue
            if dk.unknown_refs and kind != "VHD object":
                continue  # a damaged root may reference it: not judged garbage
            v = layout.written_for(key)
            if v is None:
                self.find("warning", key, f"{'an' if kind[0] in 'aeiouI' else 'a'} {kind} whose name says no catalog version", machine=m, disk=d)
            elif v <= cat.version:
                self.find("repairable", key, f"garbage: {'an' if kind[0] in 'aeiouI' else 'a'} {kind} written for catalog v{v} that no retained point "
                                             f"of v{cat.version} references ({size} bytes)", machine=m, disk=d,
                          repair=repair)
            # else: written for a version not committed yet (a build in progress)

    # -- quarantine ---------------------------------------------------------------------------

    def quarantine(self, machine: str | None) -> None:
        prefix = layout.QUARANTINE + (layout.machine_prefix(machine) if machine else "")
        for o in self.store.list(prefix):
            if o.key.endswith(".reason.json"):
                continue
            self.report.objects += 1
            original = _SUFFIX.sub("", o.key[len(layout.QUARANTINE):])
            hit = self.accepted.get(original)
            if hit is None:
                continue
            m, d, version = hit
            reason = ""
            try:
                reason = json.loads(self.store.get(o.key + ".reason.json")).get("reason", "")
            except (NotFound, ValueError, AttributeError):
                pass
            self.find("damaged", o.key, f"quarantined, yet catalog v{version} of {m}/{d} names {original} as "
                                        f"accepted" + (f" (rejected because: {reason})" if reason else ""),
                      machine=m, disk=d)


_SUFFIX = re.compile(r"(?<=\.parquet)\.\d+$")  # quarantine's ".N" for a second rejection of one name


def _toc_fault(toc: np.ndarray, data_end: int, chunks: set[int]) -> str | None:
    """Why a pack's table of contents is wrong (its chunks lie back to back from byte 0 to
    the table), or None."""
    if chunks != {len(toc)}:
        return f"its table of contents holds {len(toc)} chunks, the index root says {sorted(chunks)}"
    off = toc["offset"].astype(np.uint64)
    ends = off + toc["length"].astype(np.uint64)
    if len(toc) and (off[0] != 0 or (off[1:] != ends[:-1]).any() or int(ends[-1]) != data_end):
        return f"its table of contents does not lay its chunks back to back over bytes 0..{data_end}"
    return None


def _root_key(dk: _Disk, point: str) -> str:
    assert dk.catalog is not None
    return next(p.root for p in dk.catalog.points if p.id == point)


def _few(blocks: list[int]) -> str:
    blocks = sorted(blocks)
    head = ", ".join(map(str, blocks[:EXAMPLES]))
    return head + (f" and {len(blocks) - EXAMPLES} more" if len(blocks) > EXAMPLES else "")


__all__ = ["CheckReport", "Finding", "check_store", "parse_fraction"]
