"""The restore mode's own hash map of the machine's disk, so the cut-over re-hashes only
what changed since the last scan, never the whole disk.

In restore mode only the agent writes the machine's disk. After a full scan the agent keeps
that scan's hash map (``known-<epoch>-<disk>.npy`` in its state directory) and marks every
block each applied data log writes (``dirty-<epoch>-<disk>.npy``, persisted after the log is
fsynced and before the progress that counts it). The next scan re-hashes the dirty blocks
only, so the downtime's scan costs the last deltas, not the disk's size. Without a kept map
(a first scan, a lost state file) the scan reads the whole disk, and so it does when an image
file's modification stamp is not the one the agent's own last write left: something else
wrote it, and only a full read can say what. (A block device's node keeps no such stamp.)
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import xxhash

from hotspare.localfile import write_atomic
from hotspare.machine import DiskSpec

RUN_BLOCKS = 256  # dirty blocks read at once (16 MiB at 64 KiB)


class KnownHashes:
    def __init__(self, root: Path, vm_epoch: int, spec: DiskSpec, target: str) -> None:
        self.spec = spec
        self.target = target
        tag = f"{vm_epoch}-{spec.name}"
        self.known_file = root / f"known-{tag}.npy"
        self.dirty_file = root / f"dirty-{tag}.npy"
        self.target_file = root / f"known-{tag}.target"
        self.stamp_file = root / f"known-{tag}.stamp"
        self.blocks = -(-spec.size // spec.block_size)

    def _load(self, path: Path, dtype) -> np.ndarray | None:
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            return None
        return arr if arr.shape == (self.blocks,) and arr.dtype == dtype else None

    def _stamp(self) -> str:
        st = os.stat(self.target)
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else "device"

    def _restamp(self) -> None:
        write_atomic(self.stamp_file, self._stamp())

    def before_write(self) -> None:
        """Call before the agent writes the target: a stamp that is not the agent's own says
        something else wrote the disk, and the kept map is dropped (the next scan reads all)."""
        try:
            if self.stamp_file.read_text() != self._stamp():
                self.stamp_file.unlink()
        except OSError:
            pass

    def known(self) -> np.ndarray | None:
        """The kept map, when it is of this disk and target and nothing else wrote it since."""
        try:
            if self.target_file.read_text() != self.target or self.stamp_file.read_text() != self._stamp():
                return None
        except OSError:
            return None
        return self._load(self.known_file, np.uint64)

    def _dirty(self) -> np.ndarray:
        d = self._load(self.dirty_file, np.bool_)
        return d if d is not None else np.zeros(self.blocks, dtype=np.bool_)

    def _save(self, path: Path, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        write_atomic(path, buf.getvalue())

    def mark_log(self, raw: bytes) -> None:
        """Mark the blocks a data log (its Parquet bytes) wrote, durably."""
        t = pq.read_table(io.BytesIO(raw), columns=["offset", "length"])
        off = t.column("offset").to_numpy().astype(np.int64)
        end = off + t.column("length").to_numpy().astype(np.int64)
        bs = self.spec.block_size
        dirty = self._dirty()
        first, last = off // bs, (end - 1) // bs
        # Each extent marks first..last: a difference array over the blocks, vectorised.
        mark = np.zeros(self.blocks + 1, dtype=np.int64)
        np.add.at(mark, first, 1)
        np.add.at(mark, last + 1, -1)
        dirty |= np.cumsum(mark[:-1]) > 0
        self._save(self.dirty_file, dirty)
        if self.stamp_file.exists():  # not dropped by before_write: the stamp is the agent's own
            self._restamp()

    def rescan(self, fd: int) -> tuple[np.ndarray, int] | None:
        """The disk's hash map from the kept one, re-hashing only the dirty blocks; returns
        it with the bytes read, or None when no map is kept."""
        hashes = self.known()
        if hashes is None:
            return None
        hashes = hashes.copy()
        bs, h = self.spec.block_size, xxhash.xxh3_64_intdigest
        dirty = np.flatnonzero(self._dirty())
        read = 0
        # Runs of adjacent dirty blocks, up to RUN_BLOCKS each, one pread per run.
        breaks = np.flatnonzero(np.diff(dirty) != 1) + 1 if len(dirty) else np.zeros(0, dtype=np.int64)
        for run in np.split(dirty, breaks) if len(dirty) else []:
            for i in range(0, len(run), RUN_BLOCKS):
                part = run[i:i + RUN_BLOCKS]
                lo = int(part[0]) * bs
                hi = min((int(part[-1]) + 1) * bs, self.spec.size)
                mv = memoryview(os.pread(fd, hi - lo, lo))
                read += len(mv)
                hashes[part] = [h(mv[j:j + bs]) for j in range(0, len(mv), bs)]
        return hashes, read

    def keep(self, hashes: np.ndarray) -> None:
        """Keep ``hashes`` as the map of the disk now; nothing is dirty after it."""
        self._save(self.known_file, hashes)
        self.target_file.write_text(self.target)
        self._save(self.dirty_file, np.zeros(self.blocks, dtype=np.bool_))
        self._restamp()
