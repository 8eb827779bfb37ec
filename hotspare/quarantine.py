"""Quarantine: a rejected or damaged object moved aside, never deleted, with the reason.

``<key>`` becomes ``quarantine/<key>`` (``.1``, ``.2``... when another object was rejected
under that name before) beside ``<quarantine key>.reason.json``. The move is a create-only
copy, then the reason, then the delete of the original, so a crash at any line leaves
either the original in place (the re-run rejects it again and moves it) or both copies
(the re-run finds its own copy and deletes the original). Ingest quarantines rejected
logs, consolidation damaged ones, the EC2 host damaged snapshot records; ``hotspare check``
lists what is there.
"""

from __future__ import annotations

import json

from hotspare import layout
from hotspare.errors import AlreadyExists, NotFound
from hotspare.store.base import CopyRange, Store


def quarantine(store: Store, key: str, reason: str) -> str:
    """Move ``key`` to ``quarantine/<key>`` with a reason file; idempotent after a crash.
    Returns the quarantine key."""
    qkey = layout.quarantine_key(key)
    try:
        size = store.size(key)
    except NotFound:
        return qkey  # already moved by an earlier or concurrent run
    n = 0
    while True:
        try:
            store.compose(qkey, [CopyRange(key, 0, size)], create_only=True)
            break
        except AlreadyExists:
            if store.size(qkey) == size and n == 0:
                break  # this run (or a crashed one) copied it already
            n += 1  # a different object rejected under the same name earlier
            qkey = f"{layout.quarantine_key(key)}.{n}"
    reason_doc = {"key": key, "quarantine_key": qkey, "reason": reason, "size": size}
    try:
        store.put(qkey + ".reason.json", json.dumps(reason_doc, indent=1).encode(), create_only=True)
    except AlreadyExists:
        pass
    store.delete(key)
    return qkey
