"""The capture's persisted state, one JSON file per VM disk in the VM's work directory.

It names the epoch, the last seq uploaded and the frozen overlays already uploaded but not
yet committed; it is replaced atomically (write, fsync, rename), so a crash leaves the old
or the new state whole. The chain of overlays is not in it: QEMU (or, for a dead VM, the
qcow2 headers) is the authority on that.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from hotspare.capture.upload import last_seq_in_store
from hotspare.localfile import load_model, write_atomic
from hotspare.store.base import Store


class CaptureCursor(BaseModel):
    """Where a capture of one disk stands: its epoch and the last seq it uploaded."""

    machine: str
    disk: str
    epoch: int = Field(ge=0)
    disk_size: int = Field(gt=0)
    last_seq: int = Field(-1, ge=-1, description="last seq uploaded in this epoch")

    def last_in_store(self, store: Store) -> int:
        return last_seq_in_store(store, self.machine, self.disk, self.epoch, self.last_seq)


class CaptureState(CaptureCursor):
    shipped: list[str] = Field(default_factory=list,
                               description="frozen overlays whose extents are uploaded, not yet committed")


def load_state(path: Path) -> CaptureState | None:
    return load_model(path, CaptureState, "capture state")


def save_state(path: Path, state: CaptureState) -> None:
    write_atomic(path, state.model_dump_json(indent=1))
