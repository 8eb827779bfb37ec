"""How a catalog's accepted logs are split between its inline tail and its manifests.

A commit must not cost the window: at one log a second a disk accepts 86,400 logs a day, and
rewriting them all in every commit would be tens of MB each. So:

- The newest logs stay inline in the catalog's ``tail``. When the tail holds
  :data:`MANIFEST_LOGS` logs or more, :func:`seal` moves its oldest full batches into new
  level-0 manifests of :data:`MANIFEST_LOGS` logs each.
- Manifests merge like a counter in base :data:`FANOUT`: when the newest FANOUT manifests
  share a level k below :data:`MAX_LEVEL`, they become one manifest of level k+1. Each log is
  rewritten at most MAX_LEVEL times in its life, a merge costs at most FANOUT**MAX_LEVEL
  batches, and a catalog names at most (FANOUT - 1) refs per level below the top plus one
  top-level ref per MANIFEST_LOGS * FANOUT**MAX_LEVEL logs (about 4.6 per 150,000 logs):
  so a commit's size and time do not follow the window.
- Retention (:func:`drop_through`) drops whole manifests, and rewrites the one it cuts
  through as a new manifest of what remains.

New manifests are written create-only for the version about to be committed, before the
commit that names them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hotspare.catalog.manifest import load_manifest, load_manifests, write_manifest
from hotspare.catalog.model import AcceptedLog, Catalog, ManifestRef, Position
from hotspare.store.base import Store

MANIFEST_LOGS = 64  # logs in a level-0 manifest, and the most the tail holds after a commit
FANOUT = 8  # manifests of one level merged into one of the next
MAX_LEVEL = 3  # the top level: 64 * 8**3 = 32,768 logs, about 11 MB of JSON


@dataclass
class _Batch:
    """A manifest not written yet."""

    level: int
    logs: list[AcceptedLog]


def seal(store: Store, catalog: Catalog) -> Catalog:
    """``catalog`` with the full batches of its tail moved into manifests (merged as the
    module says), written for ``catalog.version``; ``catalog`` itself when the tail is short."""
    if len(catalog.tail) < MANIFEST_LOGS:
        return catalog
    tail = sorted(catalog.tail, key=lambda lg: lg.position)
    flushed = len(tail) // MANIFEST_LOGS * MANIFEST_LOGS
    stack: list[ManifestRef | _Batch] = list(catalog.manifests)
    for i in range(0, flushed, MANIFEST_LOGS):
        stack.append(_Batch(0, tail[i:i + MANIFEST_LOGS]))
        _merge(store, catalog, stack)
    refs = [item if isinstance(item, ManifestRef)
            else write_manifest(store, catalog.machine, catalog.disk, catalog.version, item.logs, item.level)
            for item in stack]
    return catalog.model_copy(update={"manifests": refs, "tail": tail[flushed:]})


def _merge(store: Store, catalog: Catalog, stack: list[ManifestRef | _Batch]) -> None:
    while len(stack) >= FANOUT:
        group = stack[-FANOUT:]
        level = group[0].level
        if level >= MAX_LEVEL or any(item.level != level for item in group):
            return
        refs = [item for item in group if isinstance(item, ManifestRef)]
        loaded = iter(load_manifests(store, refs, catalog.machine, catalog.disk))
        logs: list[AcceptedLog] = []
        for item in group:
            if isinstance(item, ManifestRef):
                logs.extend(next(loaded) for _ in range(item.count))
            else:
                logs.extend(item.logs)
        if any(a.position >= b.position for a, b in itertools.pairwise(logs)):
            logs.sort(key=lambda lg: lg.position)  # a late log of a fenced epoch came after newer ones
        del stack[-FANOUT:]
        stack.append(_Batch(level + 1, logs))


def drop_through(store: Store, catalog: Catalog, position: Position,
                 version: int) -> tuple[list[ManifestRef], list[AcceptedLog], dict[int, int]]:
    """Drop the accepted logs at or before ``position``: the refs and tail that remain (a
    manifest cut through is rewritten, for catalog ``version``), and ``folded`` updated with
    the last seq dropped per epoch. Reads only the manifests it cuts through or that span
    several epochs."""
    folded = dict(catalog.folded)

    def fold(logs: list[AcceptedLog]) -> None:
        for lg in logs:
            folded[lg.epoch] = max(folded.get(lg.epoch, -1), lg.last_seq)

    refs: list[ManifestRef] = []
    for ref in catalog.manifests:
        if ref.first > position:
            refs.append(ref)
        elif ref.last <= position and ref.first[0] == ref.last[0]:
            folded[ref.last[0]] = max(folded.get(ref.last[0], -1), ref.last[1])
        else:
            logs = load_manifest(store, ref, catalog.machine, catalog.disk)
            fold([lg for lg in logs if lg.position <= position])
            keep = [lg for lg in logs if lg.position > position]
            if keep:
                refs.append(write_manifest(store, catalog.machine, catalog.disk, version, keep, ref.level))
    fold([lg for lg in catalog.tail if lg.position <= position])
    return refs, [lg for lg in catalog.tail if lg.position > position], folded
