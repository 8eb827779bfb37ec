"""The capture's persisted state, one JSON file per VM disk in the VM's work directory.

It names the epoch, the last seq uploaded and the frozen overlays already uploaded but not
yet committed; it is replaced atomically (write, fsync, rename), so a crash leaves the old
or the new state whole. The chain of overlays is not in it: QEMU (or, for a dead VM, the
qcow2 headers) is the authority on that.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from hotspare import layout
from hotspare.errors import HotspareError
from hotspare.store.base import Store


class CaptureState(BaseModel):
    machine: str
    disk: str
    epoch: int = Field(ge=0)
    disk_size: int = Field(gt=0)
    last_seq: int = Field(-1, ge=-1, description="last seq uploaded in this epoch")
    shipped: list[str] = Field(default_factory=list,
                               description="frozen overlays whose extents are uploaded, not yet committed")


def load_state(path: Path) -> CaptureState | None:
    try:
        return CaptureState.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValidationError) as err:
        raise HotspareError(f"{path}: unreadable capture state ({err})") from err


def save_state(path: Path, state: CaptureState) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(state.model_dump_json(indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def last_shipped_seq(store: Store, state: CaptureState) -> int:
    """The highest seq of the epoch in the store, at least ``state.last_seq``: a crash after
    an upload but before the state was saved leaves such a log, and its seqs must not be
    used again."""
    prefix = layout.logs_prefix(state.machine, state.disk, state.epoch)
    after = f"{prefix}{layout.num(state.last_seq)}-~" if state.last_seq >= 0 else None
    last = state.last_seq
    for info in store.list(prefix, start_after=after):
        seqs = layout.parse_log_name(info.key)
        if seqs and seqs[1] > last:
            last = seqs[1]
    return last
