"""Manifests: immutable batches of accepted logs that a catalog names instead of listing them.

Terms:
- manifest: ``catalog/manifests/<version>-<first>-<last>-<digest>.json``, a JSON
  :class:`LogManifest` of accepted logs in position order. It is written create-only for
  catalog ``version``, before the commit that names it; a crash or a lost commit race leaves
  it unnamed, harmless garbage that :func:`sweep_manifests` deletes later.
- ref: the catalog's :class:`~hotspare.catalog.model.ManifestRef`, with the manifest's key,
  its position span, count, size and SHA-256. A reader checks the bytes it got against it.

Every reader that needs the accepted logs gets them from :func:`catalog_logs`, which reads
only the manifests whose span meets the positions asked for.
"""

from __future__ import annotations

import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from hotspare import layout
from hotspare.catalog.model import AcceptedLog, Catalog, ManifestRef, Position
from hotspare.errors import AlreadyExists, InvalidObject, NotFound, field_error
from hotspare.store.base import Store

MANIFEST_FORMAT = 1
# Manifests read at once: on S3 each is one GET, so overlap their latency.
READ_WORKERS = 8


class LogManifest(BaseModel):
    format_version: Literal[1] = MANIFEST_FORMAT
    machine: str
    disk: str
    logs: list[AcceptedLog] = Field(min_length=1)


def write_manifest(store: Store, machine: str, disk: str, version: int, logs: list[AcceptedLog],
                   level: int) -> ManifestRef:
    """Write ``logs`` (in position order) as a manifest for catalog ``version``, create-only."""
    raw = LogManifest(machine=machine, disk=disk, logs=logs).model_dump_json().encode()
    digest = hashlib.sha256(raw).hexdigest()
    first, last = logs[0].position, logs[-1].position
    key = layout.manifest_key(machine, disk, version, first, last, digest[:16])
    try:
        store.put(key, raw, create_only=True)
    except AlreadyExists:
        # A retry of this write, or a racing writer with the very same batch: same bytes.
        if hashlib.sha256(store.get(key)).hexdigest() != digest:
            raise InvalidObject(key, "exists with other content than this manifest (sha256 differs)") from None
    return ManifestRef(key=key, level=level, count=len(logs), first=first, last=last, size=len(raw), sha256=digest)


def load_manifest(store: Store, ref: ManifestRef, machine: str, disk: str) -> list[AcceptedLog]:
    """The logs of ``ref``'s manifest, checked against the ref: InvalidObject naming the
    key when it is missing, corrupt or not what the catalog says."""
    try:
        raw = store.get(ref.key)
    except NotFound as err:
        raise InvalidObject(ref.key, f"missing: the catalog names this manifest of {ref.count} accepted log(s) "
                                     "but the store has no such object") from err
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) != ref.size or digest != ref.sha256:
        raise InvalidObject(ref.key, f"corrupt: {len(raw)} bytes with sha256 {digest[:16]}..., the catalog "
                                     f"names {ref.size} bytes with sha256 {ref.sha256[:16]}...")
    try:
        m = LogManifest.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidObject(ref.key, f"invalid LogManifest: {field_error(err)}") from err
    logs = m.logs
    if (m.machine, m.disk) != (machine, disk):
        raise InvalidObject(ref.key, f"belongs to {m.machine}/{m.disk}, not {machine}/{disk}")
    if len(logs) != ref.count or logs[0].position != ref.first or logs[-1].position != ref.last:
        raise InvalidObject(ref.key, f"holds {len(logs)} log(s) from {logs[0].position} to {logs[-1].position}, "
                                     f"the catalog names {ref.count} from {ref.first} to {ref.last}")
    if any(a.position >= b.position for a, b in itertools.pairwise(logs)):
        raise InvalidObject(ref.key, "its logs are not in strictly increasing position order")
    return logs


def load_manifests(store: Store, refs: list[ManifestRef], machine: str, disk: str) -> list[AcceptedLog]:
    """The logs of several manifests, concatenated in the order of ``refs``."""
    if len(refs) <= 1:
        return [lg for r in refs for lg in load_manifest(store, r, machine, disk)]
    with ThreadPoolExecutor(min(READ_WORKERS, len(refs)), thread_name_prefix="hotspare-manifest") as pool:
        parts = list(pool.map(lambda r: load_manifest(store, r, machine, disk), refs))
    return [lg for part in parts for lg in part]


def catalog_logs(store: Store, catalog: Catalog, after: Position | None = None,
                 upto: Position | None = None) -> list[AcceptedLog]:
    """The accepted logs of ``catalog`` with ``after < position <= upto`` (either bound
    optional), in position order: the manifests whose span meets that range, plus the tail."""
    lo = after if after is not None else (-1, -1)
    refs = [r for r in catalog.manifests if r.last > lo and (upto is None or r.first <= upto)]
    logs = load_manifests(store, refs, catalog.machine, catalog.disk) + list(catalog.tail)
    if after is not None or upto is not None:
        logs = [lg for lg in logs if lo < lg.position and (upto is None or lg.position <= upto)]
    logs.sort(key=lambda lg: lg.position)
    return logs


def accepted_keys(store: Store, catalog: Catalog) -> set[str]:
    """Every accepted log's key (reads every manifest: for checks, not for ingest)."""
    return {lg.key for lg in catalog_logs(store, catalog)}


def sweep_manifests(store: Store, catalog: Catalog) -> int:
    """Delete the manifests ``catalog`` does not name that were written for its version or
    an older one (dropped by retention or merges, or left by a crash or a lost race);
    returns the count. Newer ones may be a concurrent commit's, about to be named."""
    named = {r.key for r in catalog.manifests}
    deleted = 0
    for o in store.list(layout.manifests_prefix(catalog.machine, catalog.disk)):
        v = layout.manifest_version(o.key)
        if v is not None and v <= catalog.version and o.key not in named:
            store.delete(o.key)
            deleted += 1
    return deleted
