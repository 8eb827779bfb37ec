"""Capture: the agent that turns a protected disk's writes into extent logs.

Terms:
- block: a fixed-size piece of the disk (the machine's block size, default 64 KiB): the
  unit of the dirty bitmaps and of the hash map.
- tracker: how a cycle finds the changed blocks: ``qemu`` (the storage daemon's dirty
  bitmaps, :mod:`.qemu`) or ``scan`` (re-reading the disk, :mod:`.scan`: a frozen view of a
  served disk, else the live disk).
- served: the disk's I/O goes through the storage daemon (always for ``qemu``; for ``scan``
  with ``--serve``, or when the machine's daemon already runs).
- storage daemon: the machine's ``qemu-storage-daemon`` (:mod:`.daemon`), which serves its
  disks for the machine's own I/O and records every write.
- cut: the state at the end of a cycle; the last log of a cycle says so. Taken from a frozen
  view (a point-in-time view of every disk at one instant) it is crash-consistent.
- hash map: the xxh3-64 of every block as last shipped; entries of blocks whose upload is in
  flight read ``UNSHIPPED``, so a crash in between re-ships and never loses a write.
- cycle: one cut of every disk, its logs uploaded, then a heartbeat.
- lease: the store object that makes one agent per machine the shipper (:mod:`.lease`).
"""
