"""The ``qemu`` tracker: every write seen by the machine's storage daemon, one cut per cycle.

A cycle, for all disks of the machine at once:

1. *freeze*: one QMP ``transaction`` adds each disk's next bitmap, disables (freezes) the
   current one and takes a view of the disk (``blockdev-backup sync=none`` into a fleece
   file). Writes acknowledged before it are in the frozen bitmap and the view; writes after it
   go to the next bitmap, and the view keeps the old bytes (copy-before-write). The cut is
   the same instant for every disk of the machine. QEMU switches the bitmaps a moment
   before the view's filter is in place, so the frozen bitmap then takes in what the next
   one holds: a write of that moment is in the view, and so in the cut.
2. *read*: the frozen bitmap's dirty extents (``nbdinfo --map`` of the view's NBD export),
   and only their bytes, through a ``snapshot-access`` node on the backup's filter. Blocks of
   zeros travel as null data, read one copy-before-write cluster per NBD request
   (:data:`~hotspare.capture.daemon.VIEW_READ`). The clean blocks are trimmed on that node
   at once, and each read is trimmed once read: the filter then stops copying a block's old
   bytes before a write, so a write costs a copy only while its block is dirty in the cut
   and not yet read.
3. *ship*: extent logs whose last one is the cycle's cut, marked consistent, uploaded
   create-only; then the hash map entries of the shipped blocks and the state.
4. *release*: only now are the view and the frozen bitmap dropped.

Crash safety: a kill of the agent at any line leaves the frozen bitmap in the daemon; the
next start merges it into the recording one, so its blocks ship again (nothing lost,
nothing more re-sent). The hash map entries of the blocks in flight read ``UNSHIPPED``
until their upload is durable, so a later scan re-sends them. When the bitmaps cannot be
trusted (the daemon was killed or the machine lost power: bitmaps missing or
``inconsistent``; the agent's state is new or does not match the store), the cycle is a
*rescan*: a fresh bitmap and a view in one transaction, and the view is compared against
the hash map, so only blocks that really differ ship, and the cut is still consistent.

With ``scan_every_cycle`` (the agent's ``--tracker scan`` on served disks) every cycle is such
a rescan: no bitmap is trusted, the whole frozen view is compared with the hash map, and the
cut is consistent. Each cycle still leaves a fresh recording bitmap behind, so a later
``--tracker qemu`` agent goes on from the last cut without a scan.

The tracker drives any block layer that has the storage daemon's interface
(:class:`~hotspare.capture.daemon.StorageDaemon`): the failed-over VM's QEMU is one
(:class:`hotspare.vm.qemu.capture.VmBlockLayer`), with the disk nodes named as the daemon's.

Cost: a cycle costs its dirty extents (read, hash, upload) plus a few QMP round trips and
one ``nbdinfo`` run, never the disk's size; a cycle without writes costs one query.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import xxhash

from hotspare.capture.budget import CpuBudget
from hotspare.capture.daemon import VIEW_READ, DaemonError, StorageDaemon, node
from hotspare.capture.nbd import NbdReader
from hotspare.capture.scan import scan
from hotspare.capture.state import UNSHIPPED, DiskState, StateDir
from hotspare.capture.upload import ship_cycle
from hotspare.errors import HotspareError
from hotspare.extentlog import LogMeta
from hotspare.extentlog.schema import MAX_EXTENT
from hotspare.faults import crash_point
from hotspare.machine import DiskSpec
from hotspare.qemuimg import qemu_img
from hotspare.store.base import Store

READ = 4 << 20  # bytes per read of the view (a multiple of every block size)
# A view's exports: its map (NBD, read-only, with the frozen bitmap), its bytes (NBD,
# writable for trims), and the FUSE file of hotspare before 2026-12 (an adopted daemon may
# still hold one).
VIEW_EXPORTS = ("view-nbd", "snap-nbd", "view-fuse")
EVERY_CYCLE = "the scan tracker compares every cut with the hash map"


@dataclass
class DiskWork:
    """One disk's part of a cycle."""

    spec: DiskSpec
    state: DiskState
    rescan: str | None = None  # why the bitmap cannot be trusted, or None
    resync_from: int | None = None
    frozen: str | None = None  # the bitmap frozen at this cycle's cut
    next: str | None = None  # the bitmap recording after it
    keys: list[str] = field(default_factory=list)
    extents: int = 0
    data_bytes: int = 0
    zero_bytes: int = 0
    read_bytes: int = 0
    scanned: str | None = None  # the reason, when this cycle was a rescan


class QemuTracker:
    """Drives the machine's daemon for the agent; one instance per agent process."""

    def __init__(self, daemon: StorageDaemon, state_dir: StateDir, store: Store, machine: str, *,
                 log_target: int, say: Callable[[str], None] | None = None, scan_every_cycle: bool = False,
                 budget: CpuBudget | None = None) -> None:
        self.daemon = daemon
        self.budget = budget or CpuBudget(None)
        self.scan_every_cycle = scan_every_cycle
        self.state_dir = state_dir
        self.store = store
        self.machine = machine
        self.log_target = log_target
        self.say = say or (lambda s: None)
        self.started = False

    # -- start: adopt or start the daemon, decide per disk whether its bitmap holds ----------
    def start(self, work: list[DiskWork]) -> None:
        fresh = self.daemon.ensure()
        self._drop_views(work)
        for w in work:
            if w.rescan is None:
                w.rescan = self._check_lineage(w)
            if w.rescan is None:
                self._merge_frozen(w)
            else:
                w.state.bitmap = None
        self.started = True
        if fresh:
            self.say(f"started the storage daemon (pid {self.daemon.pid()}), serving " +
                     ", ".join(f"{w.spec.name} at {self.daemon.served_at(w.spec.name)}" for w in work))

    def _check_lineage(self, w: DiskWork) -> str | None:
        bitmaps = self.daemon.bitmaps(w.spec.name)
        if w.state.bitmap is None:
            return "no bitmap tracked this disk before (first start, or the state was reset)"
        if any(b.inconsistent for b in bitmaps):
            return "the daemon's bitmap is inconsistent (the daemon was killed or the machine lost power)"
        recording = [b for b in bitmaps if b.recording]
        if w.state.bitmap not in {b.name for b in bitmaps} or len(recording) != 1:
            return f"the bitmap {w.state.bitmap} is gone (the daemon was killed before it stored it)"
        return None

    def _merge_frozen(self, w: DiskWork) -> None:
        """Bitmaps a dead cycle left frozen go back into the recording one: their blocks ship
        in the next cut."""
        bitmaps = self.daemon.bitmaps(w.spec.name)
        rec = next(b for b in bitmaps if b.recording)
        frozen = [b.name for b in bitmaps if not b.recording]
        if frozen:
            self.daemon.execute("block-dirty-bitmap-merge", node=node(w.spec.name), target=rec.name, bitmaps=frozen)
            for name in frozen:
                self.daemon.execute("block-dirty-bitmap-remove", node=node(w.spec.name), name=name)
            self.say(f"{w.spec.name}: merged {len(frozen)} bitmap(s) an interrupted cycle left frozen; "
                     "their blocks ship again")
        w.state.bitmap = rec.name

    # -- one cycle ---------------------------------------------------------------------------
    def cycle(self, work: list[DiskWork]) -> None:
        try:
            self._cycle(work)
        except BaseException:
            self.started = False  # the next cycle starts over: drop the view, merge the frozen bitmap
            raise

    def _cycle(self, work: list[DiskWork]) -> None:
        if self.scan_every_cycle:
            for w in work:
                w.rescan = w.rescan or EVERY_CYCLE
        if not self.started:
            self.start(work)
        busy = [w for w in work if w.rescan is not None or self._dirty(w)]
        if not busy:
            return
        self._freeze(busy)
        crash_point("agent-after-freeze")
        for w in busy:
            self._ship(w)
        crash_point("agent-before-release")
        self._release(busy)

    def _dirty(self, w: DiskWork) -> bool:
        return any(b.count for b in self.daemon.bitmaps(w.spec.name))

    def _freeze(self, busy: list[DiskWork]) -> None:
        actions = []
        for w in busy:
            d = w.spec.name
            bitmaps = self.daemon.bitmaps(d)
            if w.rescan is not None:
                for b in bitmaps:  # untrusted: the view's scan replaces them
                    self.daemon.execute("block-dirty-bitmap-remove", node=node(d), name=b.name)
            top = max((b.number for b in bitmaps), default=0)
            w.frozen = None if w.rescan is not None else w.state.bitmap
            w.next = f"hs-{top + 1}"
            fleece = self.daemon.view_dir / f"{d}.fleece.qcow2"
            fleece.unlink(missing_ok=True)
            shutil.copyfile(self._fleece_template(w.spec), fleece)  # a copy, not a qemu-img run per cycle
            self.daemon.execute("blockdev-add", {"driver": "qcow2", "node-name": f"fl-{d}", "backing": node(d),
                                                 "file": {"driver": "file", "filename": str(fleece)}})
            actions.append({"type": "block-dirty-bitmap-add",
                            "data": {"node": node(d), "name": w.next, "granularity": w.spec.block_size,
                                     "persistent": True}})
            if w.frozen is not None:
                actions.append({"type": "block-dirty-bitmap-disable", "data": {"node": node(d), "name": w.frozen}})
            actions.append({"type": "blockdev-backup",
                            "data": {"device": node(d), "target": f"fl-{d}", "sync": "none", "job-id": f"fl-{d}",
                                     "filter-node-name": f"cbw-{d}"}})
        self.daemon.execute("transaction", actions=actions)
        for w in busy:
            d = w.spec.name
            if w.frozen is not None:
                # QEMU switches the bitmaps before it installs the view's copy-before-write
                # filter, and a write that completes in between is in the view but only in
                # the new bitmap: a cut that did not read it could hold a journal's commit
                # record without the data it names. So the cut also reads what the new
                # bitmap holds now (those blocks stay dirty there and ship again next cycle).
                self.daemon.execute("block-dirty-bitmap-merge", node=node(d), target=w.frozen, bitmaps=[w.next])
            # The map: the frozen bitmap is found through the fleece's backing, the disk.
            export: dict = {"type": "nbd", "id": f"view-nbd-{d}", "node-name": f"fl-{d}", "name": f"view-{d}",
                            "writable": False}
            if w.frozen is not None:
                export["bitmaps"] = [w.frozen]
            self.daemon.execute("block-export-add", export)
            # The bytes: writable only so that trims reach the filter (discard=unmap, or
            # QEMU drops them); a write to it fails.
            self.daemon.execute("blockdev-add", {"driver": "snapshot-access", "node-name": f"sa-{d}",
                                                 "file": f"cbw-{d}", "discard": "unmap"})
            self.daemon.execute("block-export-add", {"type": "nbd", "id": f"snap-nbd-{d}", "node-name": f"sa-{d}",
                                                     "name": f"snap-{d}", "writable": True})

    def _fleece_template(self, spec: DiskSpec) -> str:
        """An empty qcow2 of the disk's size, made once: each view starts as a copy of it."""
        path = self.daemon.view_dir / f"{spec.name}.fleece-{spec.size}.template"
        if not path.exists():
            tmp = path.with_suffix(".new")
            qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={VIEW_READ}", str(tmp), str(spec.size),
                     what=f"the view template {path}")
            os.replace(tmp, path)
        return str(path)

    def _ship(self, w: DiskWork) -> None:
        with self.daemon.open_view(w.spec.name) as view:
            self._ship_view(w, view)

    def _ship_view(self, w: DiskWork, view: NbdReader) -> None:
        spec, state = w.spec, w.state
        if w.rescan is not None:
            self._ship_rescan(w, view)
            return
        assert w.frozen is not None
        runs = dirty_runs(self.daemon.view_uri(spec.name), w.frozen, cwd=self.daemon.view_cwd)
        blocks = _blocks_of(runs, spec.block_size)
        if not len(blocks):
            state.bitmap = w.next
            self.state_dir.save_meta(spec.name, state)
            return
        view.discard(_gaps(runs, spec.size))  # never read: no copy-before-write for them
        # In flight: a scan after a crash from here until the upload re-sends these blocks.
        self.state_dir.update_hashes(state, blocks, UNSHIPPED)
        hashes: list[np.ndarray] = []

        def extents() -> Iterator[tuple[int, int, memoryview | None]]:
            for ext in read_view(view, runs, spec.block_size, spec.size, release=view.discard):
                self.budget.pace()
                hashes.append(ext[3])
                w.read_bytes += ext[1]
                yield ext[:3]

        self._upload(w, extents(), consistent=True)
        self.state_dir.update_hashes(state, blocks, np.concatenate(hashes) if hashes else UNSHIPPED)
        state.bitmap = w.next
        self.state_dir.save_meta(spec.name, state)

    def _ship_rescan(self, w: DiskWork, view: NbdReader) -> None:
        """Compare the whole view with the hash map: only blocks that differ ship."""
        spec, state = w.spec, w.state
        if w.rescan != EVERY_CYCLE:  # the routine scan of the scan tracker is no news
            self.say(f"{spec.name}: scanning a frozen view against the hash map: {w.rescan}")
            w.scanned = w.rescan
        work = np.array(state.hashes)  # as scanned; the saved map takes it log by log, once uploaded
        if w.resync_from is not None:
            work ^= np.uint64(0xFFFFFFFFFFFFFFFF)  # every block differs: the whole disk is re-sent
        runs: list[tuple[int, int]] = []  # (offset, length) of each extent yielded, in seq order
        base, confirmed = state.last_seq + 1, 0  # extents [0, confirmed) are in uploaded logs

        def extents() -> Iterator[tuple[int, int, bytes | None]]:
            start = 0
            for chunk in scan(view, work, spec.block_size, spec.size, max_run=MAX_EXTENT):
                # Scanned (its changed blocks are copied out): a write there costs the view
                # no copy from now on, however long the rest of the disk takes.
                view.discard([(start, chunk.end - start)])
                start = chunk.end
                self.budget.pace()
                w.read_bytes = chunk.end
                for run in chunk.runs:
                    runs.append((run.offset, run.length))
                    yield run.offset, run.length, run.data

        def in_flight() -> None:
            # A crash from here until the map holds their hashes re-sends these blocks, also
            # one written back to the content the saved map knew (as the live scan does).
            self.state_dir.update_hashes(state, _blocks_of(runs[confirmed:], spec.block_size), UNSHIPPED)

        def uploaded(meta: LogMeta) -> None:
            nonlocal confirmed
            upto = meta.last_seq - base + 1
            done = _blocks_of(runs[confirmed:upto], spec.block_size)
            self.state_dir.update_hashes(state, done, work[done])
            confirmed = upto

        self._upload(w, extents(), consistent=True, before_upload=in_flight, after_upload=uploaded)
        self.state_dir.update_hashes(state, slice(None), work)  # type: ignore[arg-type]
        state.bitmap = w.next
        self.state_dir.save_meta(spec.name, state)

    def _upload(self, w: DiskWork, extents: Iterator[tuple[int, int, bytes | memoryview | None]], *, consistent: bool,
                before_upload: Callable[[], None] | None = None,
                after_upload: Callable[[LogMeta], None] | None = None) -> None:
        spec, state = w.spec, w.state

        def counted() -> Iterator[tuple[int, int, bytes | memoryview | None]]:
            for off, length, data in extents:
                w.extents += 1
                if data is None:
                    w.zero_bytes += length
                else:
                    w.data_bytes += length
                yield off, length, data

        def uploaded(key: str, meta: LogMeta) -> None:
            crash_point("agent-after-upload")
            if after_upload:
                after_upload(meta)
            state.last_seq = meta.last_seq
            self.state_dir.save_meta(spec.name, state)
            w.keys.append(key)

        ship_cycle(self.store, counted(), machine=self.machine, disk=spec.name, epoch=state.epoch,
                   disk_size=spec.size, last_seq=state.last_seq, workdir=self.state_dir.root, consistent=consistent,
                   log_target=self.log_target, resync_from=w.resync_from, who="agent", on_upload=uploaded,
                   before_upload=before_upload)
        if w.resync_from is not None:
            state.resynced_for = w.resync_from

    def _release(self, busy: list[DiskWork]) -> None:
        self._drop_views(busy)
        for w in busy:
            if w.frozen is not None:
                self.daemon.execute("block-dirty-bitmap-remove", node=node(w.spec.name), name=w.frozen)
            w.rescan = None
            w.frozen = None

    def _drop_views(self, work: list[DiskWork]) -> None:
        """Remove each disk's view, also one a dead cycle left behind."""
        ids = {f"{kind}-{w.spec.name}" for w in work for kind in VIEW_EXPORTS}
        for eid in ids & {e["id"] for e in self.daemon.execute("query-block-exports")}:
            self.daemon.execute("block-export-del", id=eid, mode="hard")
        _wait_exports_gone(self.daemon, ids)
        nodes = self.daemon.node_names()
        for w in work:
            if f"sa-{w.spec.name}" in nodes:  # before the job: it holds the filter sa reads
                self.daemon.execute("blockdev-del", {"node-name": f"sa-{w.spec.name}"})
        jobs = {j["device"] for j in self.daemon.execute("query-block-jobs")}
        for w in work:
            if f"fl-{w.spec.name}" in jobs:
                self.daemon.execute("block-job-cancel", device=f"fl-{w.spec.name}", force=True)
        deadline = time.monotonic() + 30
        while {f"fl-{w.spec.name}" for w in work} & {j["device"] for j in self.daemon.execute("query-block-jobs")}:
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.machine}: the view's backup job did not end in 30s")
            time.sleep(0.005)
        nodes = self.daemon.node_names()
        for w in work:
            d = w.spec.name
            if f"fl-{d}" in nodes:
                self.daemon.execute("blockdev-del", {"node-name": f"fl-{d}"})
            (self.daemon.view_dir / f"{d}.fleece.qcow2").unlink(missing_ok=True)


def _wait_exports_gone(daemon: StorageDaemon, ids: set[str]) -> None:
    deadline = time.monotonic() + 30
    while ids & {e["id"] for e in daemon.execute("query-block-exports")}:
        if time.monotonic() > deadline:
            raise DaemonError(f"exports {sorted(ids)} were not removed in 30s")
        time.sleep(0.005)


def dirty_runs(uri: str, bitmap: str, *, cwd: str | os.PathLike | None = None) -> list[tuple[int, int]]:
    """The dirty (offset, length) runs of ``bitmap`` exported at ``uri``, in offset order
    (``cwd``: where a relative socket path in ``uri`` is found)."""
    try:
        proc = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:{bitmap}", uri],
                              capture_output=True, text=True, timeout=120, cwd=cwd)
    except FileNotFoundError:
        raise HotspareError("nbdinfo is missing: apt-get install libnbd-bin (scripts/setup.sh does)") from None
    if proc.returncode != 0:
        raise DaemonError(f"nbdinfo --map of bitmap {bitmap} at {uri} failed: {proc.stderr.strip()}")
    try:
        entries = json.loads(proc.stdout)
        return [(int(e["offset"]), int(e["length"])) for e in entries if int(e["type"]) & 1]
    except (ValueError, KeyError, TypeError) as err:
        raise DaemonError(f"nbdinfo --map of bitmap {bitmap}: unreadable answer ({err})") from err


def _gaps(runs: list[tuple[int, int]], disk_size: int) -> list[tuple[int, int]]:
    """The (offset, length) ranges of the disk between ``runs`` (in offset order)."""
    out, pos = [], 0
    for off, n in runs:
        if off > pos:
            out.append((pos, off - pos))
        pos = max(pos, off + n)
    if pos < disk_size:
        out.append((pos, disk_size - pos))
    return out


def _blocks_of(runs: list[tuple[int, int]], block_size: int) -> np.ndarray:
    if not runs:
        return np.zeros(0, np.int64)
    return np.concatenate([np.arange(off // block_size, -(-(off + n) // block_size)) for off, n in runs])


def read_view(view: NbdReader, runs: list[tuple[int, int]], block_size: int, disk_size: int, *,
              release: Callable[[list[tuple[int, int]]], None] | None = None
              ) -> Iterator[tuple[int, int, memoryview | None, np.ndarray]]:
    """The extents of ``runs`` read from ``view``: (offset, length, data or None for zeros,
    the xxh3 of each block). ``data`` is a view of the read buffer, valid until the next
    extent is taken (the log writer copies it once, into its row group). Consecutive blocks
    of one kind are one extent of at most MAX_EXTENT bytes. Runs are read in batches of up
    to READ bytes, pipelined, however scattered (random writes leave runs of one block), and
    zero detection and hashing are per block over the batch, never per sector.
    ``release(ranges)`` runs after each batch with one range, from the batch's first byte to
    its last: the daemon does one trim per batch, not one per run (the caller has released
    the gaps between runs already, and a second trim of them changes nothing)."""
    step = max(block_size, READ - READ % block_size)
    buf = bytearray(step)
    mv = memoryview(buf)
    h = xxhash.xxh3_64_intdigest
    for batch in _batches(runs, disk_size, step):
        view.readv(mv, batch)
        if release is not None:
            release([(batch[0][0], batch[-1][0] + batch[-1][1] - batch[0][0])])
        # Each block's disk offset and length; the disk's last block may be short.
        starts = np.concatenate([np.arange(off, off + n, block_size) for off, n in batch])
        lengths = np.minimum(starts + block_size, disk_size) - starts
        nb, used = len(starts), int(lengths.sum())
        if used < nb * block_size:  # only the short last block: pad it with zeros
            buf[used:nb * block_size] = bytes(nb * block_size - used)
        zero = ~np.frombuffer(buf, np.uint64, nb * block_size // 8).reshape(nb, block_size // 8).any(axis=1)
        sums = np.array([h(mv[i * block_size:i * block_size + int(n)]) for i, n in enumerate(lengths.tolist())],
                        np.uint64)
        # Extents: break where the kind changes or the disk offsets stop being contiguous.
        brk = np.flatnonzero((zero[1:] != zero[:-1]) | (starts[1:] != starts[:-1] + block_size)) + 1
        for a, b in zip([0, *brk.tolist()], [*brk.tolist(), nb]):
            lo, length = a * block_size, int(starts[b - 1] + lengths[b - 1] - starts[a])
            yield int(starts[a]), length, None if zero[a] else mv[lo:lo + length], sums[a:b]


def _batches(runs: list[tuple[int, int]], disk_size: int, step: int) -> Iterator[list[tuple[int, int]]]:
    """``runs`` (clipped to the disk) cut into lists of (offset, length) of at most ``step``
    bytes in all."""
    batch: list[tuple[int, int]] = []
    room = step
    for off, length in runs:
        end = min(off + length, disk_size)
        while off < end:
            n = min(room, end - off)
            batch.append((off, n))
            off += n
            room -= n
            if not room:
                yield batch
                batch, room = [], step
    if batch:
        yield batch
