"""Tasks of the failover flow. Store I/O is retried when the fault may pass; a launch is
retried too, which is safe because a host adopts the VM already running in the work
directory instead of starting a second one."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare.catalog import load_catalog
from hotspare.consolidate.export import export_point, find_point
from hotspare.fence import fence_disk
from hotspare.machine import DiskSpec
from hotspare.store import Store
from hotspare.vm.host import VmHandle, VmSpec
from blocks.vmhost import resolve_vm_host
from tasks.common import retry_transient

STORE_RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)


@task(name="fence", **STORE_RETRY)
def fence(store: Store, machine: str, disks: list[DiskSpec], epoch: int, reason: str) -> None:
    for d in disks:
        fence_disk(store, machine, d, epoch, reason=reason)


@task(name="materialise-boot-disk", **STORE_RETRY)
def materialise_boot_disk(store: Store, machine: str, disk: DiskSpec, workdir: Path) -> tuple[str, Path]:
    """The newest (crash-consistent, when there is one) point of the boot disk as a raw image
    in the VM's work directory."""
    cat = load_catalog(store, machine, disk.name, disk.size)
    point = find_point(cat, prefer_consistent=True)
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / f"boot-{point.id}.raw"
    if not image.exists():  # export_point publishes by rename: an existing file is whole
        export_point(store, cat, point, "raw", image)
    return point.id, image


@task(name="launch-vm", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def launch_vm(host_kind: str, spec: VmSpec) -> VmHandle:
    return resolve_vm_host(host_kind).launch(spec)
