"""The vhd flow: keep a VHD object of each disk's newest point in the store (``vhd/``), for
hypervisors and cloud imports, and let garbage collection remove the older ones."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from hotspare.catalog import load_catalog
from hotspare.errors import HotspareError
from hotspare.machine import list_machines, load_machine
from hotspare.replica.gc import collect_garbage
from hotspare.replica.vhdobject import make_vhd_object
from tasks.common import resolve_store
from tasks.consolidate import commit


@flow(name="vhd", flow_run_name="vhd {machine}")
def vhd_objects(machine: str | None = None, store: str | None = None, store_block: str | None = None,
                fmt: str = "vhd") -> list[dict]:
    """Make the VHD object (``vhd`` dynamic or ``vhd-fixed``) of the newest point of every
    disk of ``machine``, or of every machine of the store when none is given."""
    logger = get_run_logger()
    st = resolve_store(store, store_block)
    rows: list[dict] = []
    failed = []
    for name in [machine] if machine else sorted(list_machines(st)):
        try:
            for disk in load_machine(st, name).disks:
                if not load_catalog(st, name, disk.name, disk.size).points:
                    rows.append({"machine": name, "disk": disk.name, "point": "(none yet)", "VHD object": ""})
                    continue
                point, key, made = make_vhd_object(st, name, disk, fmt=fmt, keep_others=False,  # type: ignore[arg-type]
                                                   commit=commit)
                collect_garbage(st, load_catalog(st, name, disk.name, disk.size))
                rows.append({"machine": name, "disk": disk.name, "point": point.id, "VHD object": key,
                             "made": "yes" if made else "already fresh", "bytes": st.size(key)})
        except HotspareError as err:
            logger.error("%s", err)
            failed.append(name)
            rows.append({"machine": name, "disk": "", "point": "", "VHD object": f"failed: {err}"})
    create_table_artifact(rows, key="vhd-objects", description="VHD objects of the newest points")
    if failed:
        raise HotspareError(f"VHD objects failed for {', '.join(failed)} (see the table artifact)")
    return rows
