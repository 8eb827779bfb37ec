"""The capture's persisted state, one JSON file per VM disk in the VM's work directory.

It names the epoch, the last seq uploaded and the frozen overlays already uploaded but not
yet committed; it is replaced atomically (write, fsync, rename), so a crash leaves the old
or the new state whole. The chain of overlays is not in it: QEMU (or, for a dead VM, the
qcow2 headers) is the authority on that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from hotspare.capture.upload import DEFAULT_LOG_TARGET, last_seq_in_store, ship_cycle
from hotspare.localfile import load_model, write_atomic
from hotspare.store.base import Store

log = logging.getLogger(__name__)


class CaptureCursor(BaseModel):
    """Where a capture of one disk stands: its epoch and the last seq it uploaded."""

    machine: str
    disk: str
    epoch: int = Field(ge=0)
    disk_size: int = Field(gt=0)
    last_seq: int = Field(-1, ge=-1, description="last seq uploaded in this epoch")

    def last_in_store(self, store: Store) -> int:
        return last_seq_in_store(store, self.machine, self.disk, self.epoch, self.last_seq)

    def ship(self, store: Store, extents: Iterable[tuple[int, int, bytes | None]], workdir: Path, source: str, *,
             log_target: int = DEFAULT_LOG_TARGET, after_upload: Callable[[], None] | None = None,
             consistent: bool = True) -> list[str]:
        """Cut ``extents`` ((offset, length, data or None for zeros), in write order) into
        logs of about ``log_target`` data bytes, written in ``workdir`` and uploaded
        create-only; each upload advances ``last_seq`` (``after_upload`` may persist it).
        ``extents`` is one capture cycle: its last log is marked as the cut, ``consistent``
        when the cycle read a frozen view. Returns the keys."""
        def uploaded(key: str, meta) -> None:
            self.last_seq = meta.last_seq
            log.info("shipped %s (seqs %d..%d) from %s", key, meta.first_seq, meta.last_seq, source)
            if after_upload:
                after_upload()

        return ship_cycle(store, extents, machine=self.machine, disk=self.disk, epoch=self.epoch,
                          disk_size=self.disk_size, last_seq=self.last_seq, workdir=workdir, consistent=consistent,
                          log_target=log_target, on_upload=uploaded)


class CaptureState(CaptureCursor):
    shipped: list[str] = Field(default_factory=list,
                               description="frozen overlays whose extents are uploaded, not yet committed")


def load_state(path: Path) -> CaptureState | None:
    return load_model(path, CaptureState, "capture state")


def save_state(path: Path, state: CaptureState) -> None:
    write_atomic(path, state.model_dump_json(indent=1))
