"""The catalog of a disk: an append-only chain of commits, one JSON object per version.

Terms:
- accepted log: an extent log that passed validation and whose seqs follow what was
  applied; the catalog names it and it is never touched again except by retention.
- tail and manifests: a catalog holds its newest accepted logs inline (the tail) and the
  older ones in create-only manifests it names (:mod:`hotspare.catalog.manifest`);
  :func:`catalog_logs` reads the whole list or a range of it.
- applied seq: per epoch, the last seq of the accepted logs (the logs form a gap-free
  chain from the epoch's first seq).
- fence: epoch n+1 begins after seq s of epoch n; logs of a fenced epoch beyond s are refused.
- recovery point: a consolidated state of the disk (epoch, seq, time, VHD object).
"""

from hotspare.catalog.model import AcceptedLog, Catalog, DrillVerdict, Fence, ManifestRef, RecoveryPoint, RejectedLog
from hotspare.catalog.io import commit_catalog, load_catalog
from hotspare.catalog.manifest import accepted_keys, catalog_logs
from hotspare.catalog.pending import list_pending

__all__ = [
    "AcceptedLog",
    "Catalog",
    "DrillVerdict",
    "Fence",
    "ManifestRef",
    "RecoveryPoint",
    "RejectedLog",
    "accepted_keys",
    "catalog_logs",
    "commit_catalog",
    "list_pending",
    "load_catalog",
]
