"""Object keys of the store, exactly as DESIGN.md lays them out.

Numbers in keys are zero-padded to 20 digits so that a lexical listing is numeric order.
"""

from __future__ import annotations

import re

PAD = 20
QUARANTINE = "quarantine/"
# fullmatch, not match with "$": "$" also matches before a trailing newline ("x\n").
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def check_name(kind: str, name: str) -> str:
    """Machine and disk names become key segments: keep them plain."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        from hotspare.errors import UsageError

        raise UsageError(
            f"{kind} name {name!r} is invalid: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def num(n: int) -> str:
    return f"{n:0{PAD}d}"


def machine_prefix(machine: str) -> str:
    return f"machines/{machine}/"


def machine_key(machine: str) -> str:
    return f"machines/{machine}/machine.json"


def heartbeat_key(machine: str) -> str:
    return f"machines/{machine}/heartbeat.json"


def state_prefix(machine: str) -> str:
    return f"machines/{machine}/state/"


def state_key(machine: str, version: int) -> str:
    return f"{state_prefix(machine)}{num(version)}.json"


def disk_prefix(machine: str, disk: str) -> str:
    return f"machines/{machine}/disks/{disk}/"


def logs_prefix(machine: str, disk: str, epoch: int) -> str:
    return f"{disk_prefix(machine, disk)}epochs/{num(epoch)}/logs/"


def log_key(machine: str, disk: str, epoch: int, first_seq: int, last_seq: int) -> str:
    return f"{logs_prefix(machine, disk, epoch)}{num(first_seq)}-{num(last_seq)}.parquet"


_LOG_NAME = re.compile(r"^(\d{20})-(\d{20})\.parquet$")


def parse_log_name(key: str) -> tuple[int, int] | None:
    """(first_seq, last_seq) from a log key, or None when the name is not a log's."""
    m = _LOG_NAME.match(key.rsplit("/", 1)[-1])
    return (int(m.group(1)), int(m.group(2))) if m else None


def failback_prefix(machine: str, vm_epoch: int) -> str:
    """The failback of VM epoch ``vm_epoch``: orders from the flow, data and hash maps."""
    return f"machines/{machine}/failback/{num(vm_epoch)}/"


def failback_orders_prefix(machine: str, vm_epoch: int) -> str:
    return f"{failback_prefix(machine, vm_epoch)}orders/"


def failback_data_key(machine: str, vm_epoch: int, order: int, disk: str, n: int) -> str:
    return f"{failback_prefix(machine, vm_epoch)}data/{num(order)}/{disk}/{n:06d}.parquet"


def failback_hashes_key(machine: str, vm_epoch: int, what: str, disk: str) -> str:
    """A hash map the restoring agent uploads: ``divergence`` or ``scan-<order>``."""
    return f"{failback_prefix(machine, vm_epoch)}hashes/{what}/{disk}.npy"


def catalog_prefix(machine: str, disk: str) -> str:
    return f"{disk_prefix(machine, disk)}catalog/"


def catalog_key(machine: str, disk: str, version: int) -> str:
    return f"{catalog_prefix(machine, disk)}{num(version)}.json"


def manifests_prefix(machine: str, disk: str) -> str:
    return f"{catalog_prefix(machine, disk)}manifests/"


def manifest_key(machine: str, disk: str, version: int, first: tuple[int, int], last: tuple[int, int],
                 digest: str) -> str:
    """A manifest of accepted logs, written for catalog ``version``, holding the logs from
    position ``first`` to ``last`` (``(epoch, seq)``); ``digest`` tells racing writers apart."""
    return (f"{manifests_prefix(machine, disk)}{num(version)}-{num(first[0])}.{num(first[1])}-"
            f"{num(last[0])}.{num(last[1])}-{digest}.json")


def manifest_version(key: str) -> int | None:
    """The catalog version a manifest key was written for, or None when not a manifest's."""
    name = key.rsplit("/", 1)[-1]
    head = name.split("-", 1)[0]
    return int(head) if len(head) == PAD and head.isdigit() and name.endswith(".json") else None


def vhd_prefix(machine: str, disk: str) -> str:
    return f"{disk_prefix(machine, disk)}vhd/"


def vhd_key(machine: str, disk: str, name: str) -> str:
    return f"{vhd_prefix(machine, disk)}{name}.vhd"


def packs_prefix(machine: str, disk: str) -> str:
    return f"{disk_prefix(machine, disk)}packs/"


def pack_key(machine: str, disk: str, version: int, pack_id: int) -> str:
    """A chunk pack written for catalog ``version`` (a random ``pack_id`` tells racing
    writers apart): a pack whose version is committed and that no catalog names is garbage."""
    return f"{packs_prefix(machine, disk)}{num(version)}-{pack_id:016x}.pack"


def index_prefix(machine: str, disk: str) -> str:
    return f"{disk_prefix(machine, disk)}index/"


def index_dir(machine: str, disk: str, point: str, version: int, token: str) -> str:
    """The objects of one build of a point's index, written for catalog ``version``; the
    ``token`` keeps racing builds of one version apart, so every write is create-only."""
    return f"{index_prefix(machine, disk)}{point}/{num(version)}-{token}/"


def index_root_key(directory: str) -> str:
    return f"{directory}root.json"


def index_page_key(directory: str, page: int) -> str:
    return f"{directory}{num(page)}.page"


def index_shard_key(directory: str, shard: int) -> str:
    return f"{directory}{num(shard)}.dedup"


def written_for(key: str) -> int | None:
    """The catalog version a pack, VHD object or index build (any of its objects) was
    written for, or None: the number that starts its name, else its directory's."""
    for name in reversed(key.split("/")[-2:]):
        if name[:PAD].isdigit() and name[PAD:PAD + 1] == "-":
            return int(name[:PAD])
    return None


def vhd_object_key(machine: str, disk: str, version: int, point: str) -> str:
    """A VHD object made from ``point``, written for catalog ``version``."""
    return vhd_key(machine, disk, f"{num(version)}-{point}")


def ebs_prefix(machine: str, region: str, disk: str) -> str:
    """The records of which EBS snapshot (in ``region``) holds which point of a disk."""
    return f"machines/{machine}/ebs/{region}/{disk}/"


def ebs_snapshot_key(machine: str, region: str, disk: str, point: str) -> str:
    """The create-only record of the EBS snapshot made from ``point`` in ``region``."""
    return f"{ebs_prefix(machine, region, disk)}{point}.json"


def quarantine_key(key: str) -> str:
    return QUARANTINE + key


def quarantine_reason_key(key: str) -> str:
    return QUARANTINE + key + ".reason.json"


def version_of(key: str) -> int | None:
    """The version number of a ``<version>.json`` key (catalog, state), or None."""
    name = key.rsplit("/", 1)[-1]
    if len(name) == PAD + 5 and name.endswith(".json") and name[:PAD].isdigit():
        return int(name[:PAD])
    return None
