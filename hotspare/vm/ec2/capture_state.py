"""Where a snapshot-based capture (EC2's, :mod:`hotspare.vm.ec2.capture`) stands per disk:
its epoch and the last seq it uploaded, kept as JSON replaced atomically. (QEMU VMs are
captured by the bitmap tracker, whose state is the agent's: :mod:`hotspare.capture.state`.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pydantic import BaseModel, Field

from hotspare.capture.upload import DEFAULT_LOG_TARGET, last_seq_in_store, ship_cycle
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
