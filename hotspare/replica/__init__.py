"""The replica: each disk's recovery points as deduplicated chunks (see DESIGN.md, Replica).

Terms:
- chunk: the content of one block of the disk (the machine's block size, 64 KiB; the last
  block may be shorter), named by its SHA-256 ``digest``. A chunk of zeros is never stored.
- pack: a create-only object of chunks (16 to 64 MiB when a consolidation writes enough),
  ending with its own table of contents (digest, offset, length of each chunk), so a check
  or a repack can read a pack without an index.
- entry: where block ``b`` of a point reads from: its chunk's digest, its xxh3-64 (the
  agent's block hash, so failback compares hashes without reading data), the pack id, the
  offset and length in the pack. A zero entry (length 0) reads as zeros.
- page: the entries of ``PAGE_CHUNKS`` consecutive blocks, one create-only object; a page
  of zeros only is not stored.
- root: a point's index, a small JSON object naming its pages (with their SHA-256) and the
  packs they reference. The catalog names each point's root. A consolidation writes new
  packs, the pages it touches and a root; every other page is the previous point's.

- dedup shard: one object of the disk-wide digest index (digest -> pack, offset, length),
  the digests of one prefix; each root names its shards, so a chunk already stored anywhere
  on the disk is not stored again.

Modules: :mod:`.consolidate` (one disk's consolidation, the flow's loop), :mod:`.build`
(its plan, part jobs and root), :mod:`.index` (entries, pages, roots), :mod:`.packs`
(writing and reading packs), :mod:`.dedup` (the digest index), :mod:`.reader` (reading any
byte range of a point), :mod:`.repack` (mostly dead packs rewritten), :mod:`.gc` (what no
retained point references), :mod:`.convert` (a store of VHD points becomes chunked),
:mod:`.serve` and :mod:`.nbdkit_plugin` (a point over NBD), :mod:`.vhdobject` (a point as a
VHD object).
"""
