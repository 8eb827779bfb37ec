"""The VM's disk as a chain of qcow2 overlays over the read-only boot disk.

Layout in ``<workdir>/overlays``, bottom to top::

    boot disk (raw or vpc, read-only) <- base.qcow2 <- ov-000001.qcow2 <- ... <- ov-N.qcow2 (active)

``base.qcow2`` holds the VM's writes that were already shipped and committed; the ``ov-*``
files above it are frozen overlays waiting to be shipped or committed, and the top one,
the active overlay, takes the guest's writes. Every node QEMU opens is named
``hs-<file stem>`` (``hs-boot`` for the boot disk), so QMP commands can address a layer by
its file name alone.

Overlays use 64 KiB clusters with extended L2 entries (32 subclusters of 2 KiB): a small
guest write then copies at most 2 KiB around it from the backing file, so a frozen
overlay holds little more than what the guest wrote, and the extents shipped stay small.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotspare.errors import HotspareError
from hotspare.vm.qmp import QmpClient

OVERLAY_DIR = "overlays"
BASE = "base.qcow2"
BOOT_NODE = "hs-boot"
OVERLAY_OPTIONS = "cluster_size=64k,extended_l2=on"
_OVERLAY_RE = re.compile(r"^ov-(\d{6,})\.qcow2$")


def overlay_dir(workdir: str | os.PathLike[str]) -> Path:
    return Path(workdir) / OVERLAY_DIR


def overlay_name(index: int) -> str:
    return f"ov-{index:06d}.qcow2"


def overlay_index(path: str | os.PathLike[str]) -> int | None:
    m = _OVERLAY_RE.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def node_name(path: str | os.PathLike[str]) -> str:
    return f"hs-{Path(path).stem}"


def qemu_img(*args: str, what: str, binary: str = "qemu-img", timeout: float = 120) -> str:
    """Run qemu-img; its stdout, or a HotspareError naming ``what`` and qemu-img's message."""
    exe = shutil.which(binary)
    if exe is None:
        raise HotspareError(f"{what}: {binary} is missing (Debian package qemu-utils)")
    try:
        proc = subprocess.run([exe, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise HotspareError(f"{what}: qemu-img {args[0]} did not finish in {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise HotspareError(f"{what}: qemu-img {args[0]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def image_size(path: str | os.PathLike[str], fmt: str) -> int:
    """The virtual size QEMU sees for an image (for vpc, after any CHS rounding)."""
    # -U: the image may be open in a running VM; reading its header is still safe.
    info = json.loads(qemu_img("info", "-U", "--output=json", "-f", fmt, os.fspath(path), what=str(path)))
    return int(info["virtual-size"])


def create_overlay(path: Path, backing: str | os.PathLike[str], backing_fmt: str, size: int) -> Path:
    """A new, empty qcow2 over ``backing``. The size is given and the backing not opened
    (-u), because a running QEMU may hold the backing file's write lock."""
    qemu_img("create", "-q", "-f", "qcow2", "-u", "-o", OVERLAY_OPTIONS, "-b", os.fspath(backing),
             "-F", backing_fmt, os.fspath(path), str(size), what=str(path))
    return path


def backing_chain(top: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """``qemu-img info --backing-chain`` of ``top``: one dict per layer, top first."""
    out = qemu_img("info", "-U", "--backing-chain", "--output=json", os.fspath(top), what=str(top))
    return json.loads(out)


def chain_from_files(workdir: str | os.PathLike[str], boot_disk: str) -> list[str]:
    """The overlay chain of a VM that is not running, bottom to top (boot disk excluded):
    the newest ``ov-*`` file whose headers lead down to base.qcow2 and the boot disk. A
    newer file that does not (a rotation that failed half-way) is ignored."""
    ovdir = overlay_dir(workdir)
    base = str(ovdir / BASE)
    candidates = sorted((p for p in ovdir.glob("ov-*.qcow2") if overlay_index(p) is not None),
                        key=overlay_index, reverse=True)
    for top in candidates:
        try:
            layers = [layer["filename"] for layer in backing_chain(top)]
        except HotspareError:
            continue
        if len(layers) >= 3 and layers[-1] == boot_disk and layers[-2] == base:
            return list(reversed(layers[:-1]))
    return []


def live_chain(q: QmpClient, device: str) -> list[str]:
    """The overlay chain QEMU runs for the guest disk ``device``, bottom to top, boot disk
    excluded: QEMU's own view, right even if a capture crashed half-way."""
    for blk in q.execute("query-block"):
        if blk.get("qdev") in (device, f"/machine/peripheral/{device}/virtio-backend") or blk.get("device") == device:
            image = blk.get("inserted", {}).get("image")
            files = []
            while image:
                files.append(image["filename"])
                image = image.get("backing-image")
            return list(reversed(files[:-1]))
    raise HotspareError(f"QMP query-block on {q.path}: no guest disk {device!r}")


def blockdev_args(boot_disk: str, fmt: str, chain: list[str]) -> list[str]:
    """QEMU ``-blockdev`` options opening the boot disk read-only and each overlay of
    ``chain`` (bottom to top) over the one below, with node names set (JSON, so that no
    path needs QEMU's comma escaping)."""
    args = ["-blockdev", json.dumps({"driver": fmt, "node-name": BOOT_NODE, "read-only": True,
                                     "file": {"driver": "file", "filename": boot_disk, "read-only": True}})]
    below = BOOT_NODE
    for path in chain:
        args += ["-blockdev", json.dumps(overlay_blockdev(path, below))]
        below = node_name(path)
    return args


def overlay_blockdev(path: str, backing: str | None) -> dict[str, Any]:
    # discard=unmap: a guest trim of whole clusters becomes zero clusters in the overlay,
    # which the capture ships as null extents (the range reads as zeros).
    return {"driver": "qcow2", "node-name": node_name(path), "discard": "unmap",
            "file": {"driver": "file", "filename": path}, "backing": backing}


@dataclass(frozen=True)
class Allocation:
    """A range the overlay itself holds: its bytes at ``host_offset`` of the overlay file,
    or zeros (``host_offset`` None)."""

    offset: int
    length: int
    host_offset: int | None


def allocations(overlay: str | os.PathLike[str]) -> list[Allocation]:
    """Every guest range that ``overlay`` itself holds (not its backing chain), in offset order.

    The overlay is opened alone (``"backing": null``), so ``present`` means allocated in this
    file: data clusters come with their offset in the file, zero clusters with ``zero``.
    Opening it alone also keeps qemu-img off the base, which a commit job may be writing."""
    spec = {"driver": "qcow2", "backing": None, "file": {"driver": "file", "filename": os.fspath(overlay)}}
    out = qemu_img("map", "-U", "--output=json", "json:" + json.dumps(spec), what=str(overlay))
    result = []
    for e in json.loads(out):
        if not e.get("present"):
            continue
        if e.get("zero"):
            result.append(Allocation(e["start"], e["length"], None))
        elif e.get("data") and "offset" in e:
            result.append(Allocation(e["start"], e["length"], int(e["offset"])))
        else:
            # Compressed or encrypted clusters have no plain offset; QEMU never writes
            # those for guest writes into the overlays hotspare creates.
            raise HotspareError(f"{overlay}: range {e['start']}+{e['length']} has no readable offset "
                                "(compressed or encrypted qcow2 clusters are not supported)")
    return result
