"""The QEMU hosts and what they share: QEMU as a process on this machine or in a container.

Terms:
- QEMU host: a :class:`~hotspare.vm.host.VmHost` that runs ``qemu-system-x86_64``
  (:class:`~hotspare.vm.qemu.cmd.QemuHost`): as a process here
  (:class:`~hotspare.vm.qemu.local.LocalQemuHost`) or in a Docker container that sees the
  same paths (:class:`~hotspare.vm.qemu.docker.DockerQemuHost`, the Docker SDK).
- command line: QEMU's arguments for a spec, run in the VM's work directory so that the QMP
  socket and the serial log have short relative names (:mod:`hotspare.vm.qemu.cmd`).
- chain: per disk, the backing (read-only), the local layer a stream fills
  (``<disk>.local.qcow2``) and the overlay that takes the guest's writes and carries the
  capture's bitmaps, on QEMU node ``d-<disk>`` (:func:`~hotspare.vm.qemu.cmd.prepare_disks`,
  :func:`~hotspare.vm.qemu.cmd.disk_blockdevs`).
- QMP: QEMU's JSON control socket, one client at a time (:mod:`hotspare.qmp`; the
  agent's storage daemon speaks it too).
- stream: a ``block-stream`` job per disk that pulls the backing into the local layer while
  the guest runs (:mod:`hotspare.vm.qemu.stream`).
- capture: the VM's writes as extent logs of a new epoch, by the agent's own bitmap tracker
  over QMP (:class:`~hotspare.vm.qemu.capture.VmCapture`); a process of its own,
  ``python -m hotspare.vm.qemu.capture``.
- screendump: the VM's screen as a PNG, encoded here when QEMU can only write PPM
  (:mod:`hotspare.vm.qemu.png`).

This package imports nothing itself: ``import hotspare.vm`` loads the local host and QMP
only, not the Docker SDK, and ``python -m hotspare.vm.qemu.capture`` does not find its module
loaded by its package first.
"""
