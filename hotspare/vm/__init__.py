"""VMs that stand in for a failed machine: launching them, watching them, capturing their writes.

Terms:
- VM host: a place that runs VMs behind one interface (:class:`~hotspare.vm.host.VmHost`):
  local QEMU (:class:`~hotspare.vm.local.LocalQemuHost`), Docker-hosted QEMU
  (:mod:`hotspare.vm.docker`) and EC2 (:mod:`hotspare.vm.ec2`); those two are imported on
  demand so that ``import hotspare.vm`` loads neither the Docker SDK nor boto3.
- VM spec: what to boot (:class:`~hotspare.vm.host.VmSpec`): the machine, its boot disk (a
  local raw or VHD image materialised from the replica), CPUs, memory, a work directory.
- VM handle: the JSON-serialisable record of one launched VM
  (:class:`~hotspare.vm.host.VmHandle`): host kind, VM id, process or container, QMP socket,
  serial log, overlays, accelerator. A flow keeps it in the machine's state to find the VM
  again after the flow itself crashed.
- overlay: a qcow2 file whose backing file is the layer below it; the VM's disk is the
  read-only boot disk under a chain of overlays (:mod:`hotspare.vm.chain`), so the replica
  image is never modified and the VM's writes land in the top overlay only.
- capture: turning the VM's writes into extent logs of a new epoch in the store
  (:class:`~hotspare.vm.capture.VmCapture`), by freezing the top overlay under a fresh one
  every few seconds and shipping what the frozen one holds.
- QMP: QEMU's JSON control socket (:mod:`hotspare.vm.qmp`).

Engine code: no Prefect here.
"""

from hotspare.vm.capture import VmCapture
from hotspare.vm.capture_state import CaptureState
from hotspare.vm.host import VmHandle, VmHost, VmSpec, load_handle, save_handle
from hotspare.vm.local import LocalQemuHost
from hotspare.vm.qmp import QmpClient, QmpError, qmp_execute

__all__ = [
    "CaptureState",
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
