"""Tasks of the failover flow. Store I/O is retried when the fault may pass; a launch is
retried too, which is safe because a host adopts the VM already running in the work
directory instead of starting a second one."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from hotspare import failover as engine
from hotspare.fence import fence_disk
from hotspare.machine import DiskSpec
from hotspare.store import Store
from hotspare.vm.host import VmDisk, VmHandle, VmSpec
from hotspare.vm.qemu.stream import DiskStream, start_streams, wait_streams
from blocks.vmhost import resolve_vm_host
from tasks.common import retry_transient

STORE_RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)


@task(name="fence", **STORE_RETRY)
def fence(store: Store, machine: str, disks: list[DiskSpec], epoch: int, reason: str) -> None:
    for d in disks:
        fence_disk(store, machine, d, epoch, reason=reason)


@task(name="disk-backings", **STORE_RETRY)
def disk_backings(store: Store, machine: str, disks: list[DiskSpec], workdir: Path,
                  host_kind: str) -> list[tuple[str, VmDisk]]:
    """Per disk of the machine, in its order: the point it starts from and the backing the
    VM's overlay reads: the point served over NBD, or what the host makes of it when it
    cannot read NBD (EC2: the point's EBS snapshot)."""
    host = resolve_vm_host(host_kind)
    return [engine.disk_backing(store, machine, d, workdir, host=host) for d in disks]


@task(name="launch-vm", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def launch_vm(host_kind: str, spec: VmSpec) -> VmHandle:
    return resolve_vm_host(host_kind).launch(spec)


@task(name="stream-disks", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def stream_disks(host_kind: str, handle: VmHandle) -> list[str]:
    """Start pulling every disk's backing into the VM's local layer (QMP block-stream)."""
    return start_streams(resolve_vm_host(host_kind), handle)


@task(name="disks-local", cache_policy=NO_CACHE)
def wait_disks_local(host_kind: str, handle: VmHandle, timeout: float) -> list[DiskStream]:
    """Wait (up to ``timeout`` s) until every disk is local, with a progress artifact; the
    handle records which backings are no longer needed (``backing_needed``)."""
    artifact = create_progress_artifact(0.0, description=f"{handle.machine}: disks pulled local from the replica")
    last = [-1.0]

    def report(status: list[DiskStream]) -> None:
        total = sum(s.length for s in status) or 1
        pct = round(100.0 * sum(s.offset if not s.done else s.length for s in status) / total, 1)
        if pct != last[0]:
            update_progress_artifact(artifact, pct)
            last[0] = pct

    return wait_streams(resolve_vm_host(host_kind), handle, timeout=timeout, on_progress=report)
