"""Consolidation: fold accepted extent logs into a disk's VHD objects in the store.

Terms:
- point: a consolidated state of a disk, named by the (epoch, seq) of the last write it
  holds; its VHD object is ``vhd/point-<epoch>-<seq>.vhd``. ``current`` is the newest
  point, ``base`` the oldest kept (the start of the retention window); any point between
  is ``base`` plus the logs up to it.
- source run: a piece of a changed block whose final bytes come from one extent-log row
  (or are zeros). Computed from the logs' offset/length/checksum columns only, so bytes that
  a later write superseded are never downloaded.
- window: a stretch of the new VHD object that becomes one part of the multipart compose;
  a window that holds no changed byte is copied on the server from the previous VHD.

Modules: :mod:`.sources` (which bytes come from where), :mod:`.plan` (the new VHD's layout
and its parts), :mod:`.build` (the bytes of a changed part), :mod:`.retention`,
:mod:`.export`.
"""
