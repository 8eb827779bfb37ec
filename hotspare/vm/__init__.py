"""VMs that stand in for a failed machine: launching them, watching them, capturing their writes.

Terms:
- VM host: a place that runs VMs behind one interface (:class:`~hotspare.vm.host.VmHost`):
  local QEMU (:class:`~hotspare.vm.qemu.local.LocalQemuHost`) and Docker-hosted QEMU
  (:mod:`hotspare.vm.qemu.docker`), in :mod:`hotspare.vm.qemu` with what they share, and EC2
  (:mod:`hotspare.vm.ec2`); Docker's and EC2's are imported on demand so that
  ``import hotspare.vm`` loads neither the Docker SDK nor boto3.
- VM spec: what to boot (:class:`~hotspare.vm.host.VmSpec`): the machine, every disk in the
  machine's order (:class:`~hotspare.vm.host.VmDisk`: name, backing, backing format, size;
  the first boots), CPUs, memory, a work directory.
- backing: what a disk starts from, never written: a local image or a read-only NBD export
  on a unix socket (``nbd+unix:///EXPORT?socket=PATH``, as ``hotspare serve`` gives).
- overlay: a disk's local qcow2 layers in the work directory, over its backing
  (:func:`~hotspare.vm.qemu.cmd.disk_blockdevs`): the guest's writes land in the top one.
- stream: QMP ``block-stream`` pulling a backing into the local layer while the VM runs
  (:mod:`hotspare.vm.qemu.stream`); when it ends the backing is no longer needed.
- VM handle: the JSON-serialisable record of one launched VM
  (:class:`~hotspare.vm.host.VmHandle`): host kind, VM id, process or container, QMP socket,
  serial log, each disk (:class:`~hotspare.vm.host.HandleDisk`), accelerator. A flow keeps
  it in the machine's state to find the VM again after the flow itself crashed.
- capture: turning the VM's writes into extent logs of a new epoch in the store
  (:class:`~hotspare.vm.qemu.capture.VmCapture`), with QEMU's dirty bitmaps and point-in-time
  views, cut by the same tracker as the machine's storage daemon; an EC2 VM's by EBS
  snapshots of its volumes (:mod:`hotspare.vm.ec2.capture`).
- QMP: QEMU's JSON control socket (:mod:`hotspare.qmp`).

Engine code: no Prefect here.
"""

from typing import TYPE_CHECKING, Any

from hotspare.vm.host import HandleDisk, VmDisk, VmHandle, VmHost, VmSpec, load_handle, save_handle
from hotspare.vm.qemu.local import LocalQemuHost
from hotspare.qmp import QmpClient, QmpError, qmp_execute

if TYPE_CHECKING:
    from hotspare.vm.qemu.capture import VmCapture


def __getattr__(name: str) -> Any:
    # On demand, so that ``python -m hotspare.vm.qemu.capture`` does not find the module loaded
    # by its own package first.
    if name == "VmCapture":
        from hotspare.vm.qemu.capture import VmCapture

        return VmCapture
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "HandleDisk",
    "VmDisk",
    "LocalQemuHost",
    "QmpClient",
    "QmpError",
    "VmCapture",
    "VmHandle",
    "VmHost",
    "VmSpec",
    "load_handle",
    "qmp_execute",
    "save_handle",
]
