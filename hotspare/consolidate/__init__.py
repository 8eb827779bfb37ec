"""What consolidation reads from the logs, and what it gives back: the rows that supply a
point's bytes, the way back from a damaged log, and a point as a local image. Folding the
logs into a new point of chunks is :mod:`hotspare.replica.consolidate`.

Terms:
- point: a consolidated state of a disk, named by the (epoch, seq) of the last write it
  holds; the catalog names its root (:mod:`hotspare.replica`). ``current`` is the newest
  point, ``base`` the oldest kept (the start of the retention window).
- source run: a piece of a changed block whose final bytes come from one extent-log row
  (or are zeros). Computed from the logs' offset/length/checksum columns only, so bytes that
  a later write superseded are never downloaded.
- damaged log: an accepted log that is gone, does not decode, or fails its checksums; the
  catalog drops it, quarantines it and asks the agent for a resync.

Modules: :mod:`.sources` (which bytes come from where), :mod:`.damage` (dropping a damaged
log and asking for a resync), :mod:`.export` (a point as a raw or VHD image).
"""
