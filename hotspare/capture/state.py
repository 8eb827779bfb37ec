"""The agent's persisted state per disk: epoch, last shipped seq and the hash map.

Kept on the protected machine (``<state dir>/<disk>.json`` plus a hashes file it names), and
replaced atomically: a new hashes file is written and fsynced under a new name, then the JSON
is replaced by rename, then the old hashes file is removed. A crash at any point leaves the
old or the new state whole.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hotspare.errors import HotspareError
from hotspare.extentlog.schema import zero_checksum
from hotspare.localfile import write_atomic


@dataclass
class DiskState:
    epoch: int
    last_seq: int  # last seq shipped in this epoch, -1 before the first
    block_size: int
    disk_size: int
    hashes: np.ndarray  # uint64 per block, as last shipped
    resynced_for: int | None = None  # the catalog's resync_from this agent already answered
    bitmap: str | None = None  # qemu tracker: the daemon's bitmap recording since the last shipped cut
    hashes_file: str | None = None  # the file ``hashes`` was loaded from or saved to

    @classmethod
    def fresh(cls, *, epoch: int, block_size: int, disk_size: int) -> "DiskState":
        """The state before the first pass: every block taken as zeros, so the seed ships
        only the non-zero blocks."""
        return cls(epoch=epoch, last_seq=-1, block_size=block_size, disk_size=disk_size,
                   hashes=zero_hashes(disk_size, block_size))


def zero_hashes(disk_size: int, block_size: int) -> np.ndarray:
    n = -(-disk_size // block_size)
    hashes = np.full(n, zero_checksum(block_size), dtype=np.uint64)
    tail = disk_size - (n - 1) * block_size
    if tail != block_size:
        hashes[-1] = zero_checksum(tail)
    return hashes


class StateDir:
    """The agent's state directory for one machine."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def _json(self, disk: str) -> Path:
        return self.root / f"{disk}.json"

    def load(self, disk: str, *, in_place: bool = False) -> DiskState | None:
        """The disk's state; with ``in_place`` its hash map is the file itself, mapped
        writable, so that :meth:`update_hashes` costs the blocks it changes, not the disk."""
        p = self._json(disk)
        try:
            meta = json.loads(p.read_text())
            hashes = np.load(self.root / meta["hashes"], allow_pickle=False, mmap_mode="r+" if in_place else None)
            state = DiskState(epoch=int(meta["epoch"]), last_seq=int(meta["last_seq"]),
                              block_size=int(meta["block_size"]), disk_size=int(meta["disk_size"]),
                              hashes=hashes, resynced_for=meta.get("resynced_for"), bitmap=meta.get("bitmap"),
                              hashes_file=meta["hashes"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, OSError) as err:
            raise HotspareError(f"{p}: agent state unreadable ({err}); remove it to re-seed the disk") from err
        if hashes.dtype != np.uint64 or len(hashes) != -(-state.disk_size // state.block_size):
            raise HotspareError(f"{p}: hash map does not match the disk geometry; remove it to re-seed the disk")
        return state

    def save(self, disk: str, state: DiskState) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        old = None
        try:
            old = json.loads(self._json(disk).read_text()).get("hashes")
        except (FileNotFoundError, ValueError):
            pass
        name = f"{disk}.hashes.{uuid.uuid4().hex[:12]}.npy"
        with open(self.root / name, "wb") as f:
            np.save(f, state.hashes, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        state.hashes_file = name
        self.save_meta(disk, state)
        if old and old != name:
            (self.root / old).unlink(missing_ok=True)

    def save_meta(self, disk: str, state: DiskState) -> None:
        """Replace the JSON only, naming the hash map file already on disk."""
        assert state.hashes_file, "save() the hash map first"
        meta = dict(epoch=state.epoch, last_seq=state.last_seq, block_size=state.block_size,
                    disk_size=state.disk_size, hashes=state.hashes_file, resynced_for=state.resynced_for,
                    bitmap=state.bitmap)
        write_atomic(self._json(disk), json.dumps(meta))

    @staticmethod
    def update_hashes(state: DiskState, blocks: np.ndarray, values: np.ndarray | int) -> None:
        """Write ``values`` for ``blocks`` into a hash map loaded ``in_place``, durably."""
        state.hashes[blocks] = values
        if isinstance(state.hashes, np.memmap):
            state.hashes.flush()


# A hash-map entry for a block whose content is being shipped: no block hashes to it (but
# with a chance of 2**-64), so a scan re-sends it unless the upload finished and the entry
# got the block's real hash. Written before an upload, replaced after it.
UNSHIPPED = np.uint64(0x68737061_72652121)
