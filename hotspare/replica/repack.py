"""Repacking: packs that are mostly dead are rewritten with their live chunks only.

A chunk dies when no retained point reads it any more (a later write replaced its block and
the window dropped the points that had it). A pack's live share is estimated from the roots'
entry counts (its ``refs`` in each retained root, at most its chunk count); a pack read only
by the current point whose live share is below ``DEAD_SHARE`` is repacked: its live chunks
go into a new pack, the pages of the current point that read it are rewritten, and a new root
of the same point is committed (create-only, like any build). The old pack is then garbage,
deleted after that commit. Packs that older retained points still read are left alone: their
pages would need rewriting too, and the window drops those points soon enough.
"""

from __future__ import annotations

import secrets

import numpy as np

from hotspare import layout
from hotspare.catalog import Catalog
from hotspare.replica import dedup
from hotspare.replica.index import (
    IndexRoot,
    digest_of,
    pack_id,
    page_bytes,
    page_ref,
    read_page,
    read_root,
    root_bytes,
)
from hotspare.replica.packs import PackWriter
from hotspare.replica.reader import ChunkReader
from hotspare.store.base import Store

DEAD_SHARE = 0.5  # repack a pack once more than half of it is dead


def dead_bytes(roots: list[IndexRoot]) -> int:
    """An estimate of the dead bytes in the packs the retained points read."""
    packs: dict[str, tuple[int, int, int]] = {}
    for r in roots:
        for pid, ref in r.packs.items():
            size, chunks, refs = packs.get(pid, (ref.size, ref.chunks, 0))
            packs[pid] = (size, chunks, max(refs, ref.refs))
    return int(sum(size * (1 - min(1.0, refs / chunks)) for size, chunks, refs in packs.values() if chunks))


def candidates(catalog: Catalog, roots: dict[str, IndexRoot]) -> list[str]:
    """Pack ids of the current point worth repacking."""
    cur = catalog.point("current")
    if cur is None or not cur.root:
        return []
    root = roots[cur.root]
    others = {pid for key, r in roots.items() if key != cur.root for pid in r.packs}
    return [pid for pid, ref in root.packs.items()
            if pid not in others and ref.chunks and ref.refs / ref.chunks < 1 - DEAD_SHARE]


def repack(store: Store, catalog: Catalog, packs: list[str]) -> tuple[Catalog, int] | None:
    """The next catalog, whose current point reads ``packs``' live chunks from a new pack;
    returns it with the bytes the new pack took, or None when there is nothing to do."""
    cur = catalog.point("current")
    if not packs or cur is None:
        return None
    old = read_root(store, cur.root)
    moving = {int(p, 16) for p in packs}
    version, token = catalog.version + 1, secrets.token_hex(4)
    directory = layout.index_dir(catalog.machine, catalog.disk, cur.id, version, token)
    reader = ChunkReader(store, old, readahead=0)
    writer = PackWriter(store, catalog.machine, catalog.disk, version)
    moved: dict[tuple[int, int], tuple[int, int]] = {}  # (old pack, offset) -> (new pack, offset)
    pages = {}
    rows: list[tuple[bytes, int, int, int]] = []  # the moved chunks, for the dedup index
    for page in sorted(old.pages):
        entries = read_page(store, old, page)
        hit = np.isin(entries["pack"], list(moving)) & (entries["length"] > 0)
        if not hit.any():
            continue
        new = entries.copy()
        first = page * old.page_chunks
        blocks = (np.flatnonzero(hit) + first).tolist()
        chunks = reader.blocks(blocks)
        for b in blocks:
            e = new[b - first]
            where = (int(e["pack"]), int(e["offset"]))
            if where not in moved:
                moved[where] = writer.add(digest_of(e), chunks[b])
                rows.append((digest_of(e), *moved[where], int(e["length"])))
            e["pack"], e["offset"] = moved[where]
        pages[page] = new
    writer.flush()
    root = old.model_copy(deep=True)
    for page, entries in pages.items():
        body = page_bytes(page, entries)
        key = layout.index_page_key(directory, page)
        store.put(key, body, create_only=True)
        root.pages[page] = page_ref(key, body)
    moved_refs = {pid: root.packs.pop(pid).refs for pid in packs if pid in root.packs}
    for pid, ref in writer.written.items():
        root.packs[pid] = ref.model_copy(update={"refs": 0})
    # Every entry that read a moved pack now reads a new one: count them there.
    for page, entries in pages.items():
        for p, n in zip(*np.unique(entries["pack"][entries["length"] > 0], return_counts=True)):
            if pack_id(int(p)) in writer.written:
                root.packs[pack_id(int(p))].refs += int(n)
    assert sum(moved_refs.values()) == sum(root.packs[p].refs for p in writer.written), "repack lost an entry"
    uploaded = writer.uploaded + dedup.update(store, directory, old, root, dedup.rows(rows))
    key = layout.index_root_key(directory)
    store.put(key, root_bytes(root), create_only=True)
    points = [p.model_copy(update={"root": key}) if p.id == cur.id else p for p in catalog.points]
    return catalog.next(points=points), uploaded
