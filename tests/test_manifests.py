"""Catalog manifests: a commit stays small however many logs the window holds, manifests
round-trip and are checked on read, retention and garbage collection keep the content right,
and catalogs of format 1 (every log inline) still read."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.capture.agent import Agent
from hotspare.catalog import AcceptedLog, Catalog, catalog_logs, commit_catalog, load_catalog, segments
from hotspare.catalog.manifest import load_manifest, sweep_manifests, write_manifest
from hotspare.replica.consolidate import consolidate_disk
from hotspare.replica.gc import collect_garbage, retention
from hotspare.consolidate.export import export_point
from hotspare.errors import InvalidObject
from hotspare.ingest import batches, ingest_disk
from hotspare.machine import MachineConfig, Policy, parse_disk_arg, save_machine
from hotspare.store import open_store
from hotspare.store.base import ObjectInfo
from hotspare.versioned import load
from tests.helpers import cli, qemu_io, random_image, same_file

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)
SIZE = 1 << 30


def fake_logs(first: int, n: int, epoch: int = 0) -> list[AcceptedLog]:
    """``n`` accepted logs of one seq each from seq ``first`` (catalog entries only)."""
    return [AcceptedLog(key=layout.log_key("m", "d", epoch, s, s), epoch=epoch, first_seq=s, last_seq=s, rows=1,
                        data_bytes=4096, covered_bytes=4096, size=900, captured_at=T0, accepted_at=T0, cut=True)
            for s in range(first, first + n)]


def add_logs(store, cat: Catalog, logs: list[AcceptedLog]) -> Catalog:
    """What ingest's next catalog does with accepted logs, committed."""
    applied = {**cat.applied, logs[-1].epoch: logs[-1].last_seq}
    return commit_catalog(store, cat.next(tail=[*cat.tail, *logs], applied=applied))


def commit_size(store, cat: Catalog) -> int:
    return store.size(layout.catalog_key(cat.machine, cat.disk, cat.version))


def test_a_commit_stays_small_however_many_logs_the_window_holds(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    cat = Catalog(machine="m", disk="d", version=0, disk_size=SIZE)
    sizes, seq = [], 0
    for _ in range(40):  # 40 ingests of 500 logs: 20,000 accepted logs
        cat = add_logs(st, cat, fake_logs(seq, 500))
        seq += 500
        sizes.append(commit_size(st, cat))
    assert cat.log_count == 20_000 and len(cat.tail) < segments.MANIFEST_LOGS
    assert len(cat.manifests) <= (segments.FANOUT - 1) * segments.MAX_LEVEL + 20_000 // (
        segments.MANIFEST_LOGS * segments.FANOUT ** segments.MAX_LEVEL) + 1
    # The next commit (10 logs) on the 20,000-log window, and one with the same tail on an
    # empty window: they differ by the manifest refs only.
    nxt = add_logs(st, cat, fake_logs(seq, 10))
    empty = add_logs(st, Catalog(machine="m", disk="e", version=0, disk_size=SIZE),
                     [lg.model_copy(update={"key": lg.key.replace("/d/", "/e/")})
                      for lg in fake_logs(0, len(nxt.tail))])
    assert len(empty.tail) == len(nxt.tail) and not empty.manifests
    assert commit_size(st, nxt) - commit_size(st, empty) < 8_000, "a commit names manifests, not every log"
    inline_every_log = 20_010 * len(fake_logs(0, 1)[0].model_dump_json())
    assert max(sizes) < 40_000 and commit_size(st, nxt) * 100 < inline_every_log
    assert max(sizes[20:]) <= max(sizes[:20]) + 3_000, "commits do not grow with the window"
    # Nothing was lost or reordered on the way.
    logs = catalog_logs(st, load_catalog(st, "m", "d", SIZE))
    assert [lg.first_seq for lg in logs] == list(range(seq + 10))
    # A range reads only the manifests it meets.
    some = catalog_logs(st, nxt, after=(0, 19_000), upto=(0, 19_099))
    assert [lg.first_seq for lg in some] == list(range(19_001, 19_100))


def test_manifest_round_trip_and_catalog_json(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    logs = fake_logs(5, 100)
    ref = write_manifest(st, "m", "d", 3, logs, level=1)
    assert ref.key.startswith(layout.manifests_prefix("m", "d")) and layout.manifest_version(ref.key) == 3
    assert ref.first == (0, 5) and ref.last == (0, 104) and ref.count == 100
    assert load_manifest(st, ref, "m", "d") == logs
    assert write_manifest(st, "m", "d", 3, logs, level=1) == ref, "a retried write is the same manifest"
    cat = commit_catalog(st, Catalog(machine="m", disk="d", version=1, disk_size=SIZE, tail=fake_logs(0, 150),
                                     applied={0: 149}))
    assert len(cat.tail) == 150 % segments.MANIFEST_LOGS and cat.manifests
    again = load_catalog(st, "m", "d", SIZE)
    assert again == cat and catalog_logs(st, again) == fake_logs(0, 150)
    assert again.newest == {0: layout.log_key("m", "d", 0, 149, 149)}


@pytest.mark.parametrize("fault", ["corrupt", "missing", "invalid"])
def test_a_bad_manifest_gives_one_line_naming_its_key(tmp_path: Path, fault: str) -> None:
    st = open_store(str(tmp_path / "store"))
    image = tmp_path / "disk.img"
    random_image(image, 8 << 20)
    cfg = MachineConfig(name="m", disks=[parse_disk_arg(f"d={image}")])
    save_machine(st, cfg, create_only=True)
    from hotspare.catalog import RecoveryPoint

    point = RecoveryPoint(id="0-0", epoch=0, seq=0, time=T0, bytes_applied=0,
                          root=layout.index_root_key(layout.index_dir("m", "d", "0-0", 1, "t")))
    cat = commit_catalog(st, Catalog(machine="m", disk="d", version=1, disk_size=8 << 20, tail=fake_logs(0, 200),
                                     applied={0: 199}, points=[point]))
    key = cat.manifests[0].key
    if fault == "corrupt":
        raw = bytearray(st.get(key))
        raw[100] ^= 1
        st.put(key, bytes(raw))
        reason = "corrupt: "
    elif fault == "missing":
        st.delete(key)
        reason = "missing: the catalog names this manifest"
    else:  # right digest, wrong content: what a buggy writer could leave
        doc = json.loads(st.get(key))
        doc["logs"][0]["rows"] = 0
        raw = json.dumps(doc).encode()
        import hashlib

        ref = cat.manifests[0].model_copy(update={"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()})
        st.put(key, raw)
        cat = commit_catalog(st, cat.next(manifests=[ref, *cat.manifests[1:]]))
        reason = "invalid LogManifest: logs.0.rows"
    with pytest.raises(InvalidObject) as err:
        catalog_logs(st, cat)
    assert str(err.value).startswith(f"{key}: {reason}") and "\n" not in str(err.value)
    # ``status`` counts the logs after the current point: it reads the manifests.
    r = cli("status", "m", "--json", env={"HOTSPARE_STORE": st.url}, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert f"{key}: {reason}" in r.stderr


def test_format_1_catalogs_with_every_log_inline_still_read(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    logs = fake_logs(0, 300)
    doc = {"format_version": 1, "machine": "m", "disk": "d", "version": 4, "disk_size": SIZE, "epoch": 0,
           "applied": {"0": 299}, "logs": [json.loads(lg.model_dump_json()) for lg in logs]}
    st.put(layout.catalog_key("m", "d", 4), json.dumps(doc).encode(), create_only=True)
    old = load_catalog(st, "m", "d", SIZE)
    assert old.manifests == [] and catalog_logs(st, old) == logs
    assert old.newest == {0: logs[-1].key}
    nxt = add_logs(st, old, fake_logs(300, 5))  # the first new commit moves the old list into manifests
    assert len(nxt.tail) < segments.MANIFEST_LOGS and catalog_logs(st, nxt) == logs + fake_logs(300, 5)


def test_retention_rewrites_the_manifest_it_cuts_and_gc_sweeps_only_old_unnamed_ones(tmp_path: Path) -> None:
    st = open_store(str(tmp_path / "store"))
    cat = add_logs(st, Catalog(machine="m", disk="d", version=0, disk_size=SIZE), fake_logs(0, 1000))
    from hotspare.catalog import RecoveryPoint

    points = [RecoveryPoint(id=f"0-{s}", epoch=0, seq=s, time=T0 + timedelta(seconds=s), bytes_applied=0)
              for s in (99, 500, 999)]
    cat = commit_catalog(st, cat.next(points=points))
    before = catalog_logs(st, cat)
    # The retention commit is version v+1. A manifest written for v+2 may be a concurrent
    # commit's, about to be named: kept. One written for v+1 lost that version's race: swept.
    pending = write_manifest(st, "m", "d", cat.version + 2, fake_logs(5000, 3), level=0)
    lost = write_manifest(st, "m", "d", cat.version + 1, fake_logs(6000, 3), level=0)
    nxt = commit_catalog(st, retention(st, cat, Policy(retention_points=2, retention_hours=10**6)))
    assert [lg.first_seq for lg in catalog_logs(st, nxt)] == list(range(501, 1000))
    assert nxt.folded == {0: 500} and [p.id for p in nxt.points] == ["0-500", "0-999"]
    cut = [r for r in nxt.manifests if r.first == (0, 501)]
    assert cut and layout.manifest_version(cut[0].key) == nxt.version, "the cut manifest was rewritten"
    named_before = {r.key for r in cat.manifests}
    collect_garbage(st, nxt)
    left = {o.key for o in st.list(layout.manifests_prefix("m", "d"))}
    assert left == {r.key for r in nxt.manifests} | {pending.key}
    dropped = named_before - {r.key for r in nxt.manifests}
    assert dropped and not dropped & left and lost.key not in left
    # Every catalog version still loads whole, and the older ones were not rewritten.
    for v in range(1, nxt.version + 1):
        load(st, layout.catalog_prefix("m", "d"), v, Catalog)
    assert before[501:] == catalog_logs(st, nxt)


def test_batches_cut_by_count_and_bytes() -> None:
    objs = [ObjectInfo(f"k{i}", 10 << 20) for i in range(100)]
    assert [len(b) for b in batches(objs)] == [25, 25, 25, 25], "256 MiB at most"
    small = [ObjectInfo(f"s{i}", 100) for i in range(130)]
    assert [len(b) for b in batches(small)] == [64, 64, 2]
    big = [ObjectInfo("a", 100), ObjectInfo("huge", 1 << 30), ObjectInfo("b", 100)]
    assert batches(big) == [["a"], ["huge"], ["b"]]
    assert [k for b in batches(small) for k in b] == [o.key for o in small] and batches([]) == []


def test_consolidation_with_manifests_keeps_every_point_right(tmp_path: Path, monkeypatch) -> None:
    """Many small logs, tiny manifests and merges, retention moving the base through them:
    every kept point exported equals the disk at that moment."""
    monkeypatch.setattr(segments, "MANIFEST_LOGS", 3)
    monkeypatch.setattr(segments, "FANOUT", 2)
    monkeypatch.setattr(segments, "MAX_LEVEL", 2)
    size = 16 << 20
    image = tmp_path / "disk.img"
    random_image(image, size, seed=4, fill=0.5)
    st = open_store(str(tmp_path / "store"))
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")])
    save_machine(st, cfg, create_only=True)
    disk = cfg.disks[0]
    policy = Policy(retention_points=3, retention_hours=10**6)
    snaps: dict[str, Path] = {}
    with Agent(st, cfg, tmp_path / "agent", tracker="scan", log_target=1 << 20) as agent:  # written directly
        for rnd in range(6):
            if rnd:
                qemu_io(image, *[f"write -P {rnd * 7 + i} {((rnd * 5 + i * 3) % 15) << 20} 700k" for i in range(4)])
            agent.cycle()
            ingest_disk(st, "m1", disk)
            point = consolidate_disk(st, "m1", disk, policy).point
            snaps[point] = tmp_path / f"snap-{rnd}.raw"
            shutil.copyfile(image, snaps[point])
    cat = load_catalog(st, "m1", "root", size)
    assert cat.manifests and cat.folded and len(cat.points) == 3
    assert {o.key for o in st.list(layout.manifests_prefix("m1", "root"))} == {r.key for r in cat.manifests}
    base = cat.point("base")
    logs = catalog_logs(st, cat)
    assert logs and all(lg.position > base.position for lg in logs)
    assert sweep_manifests(st, cat) == 0
    for p in cat.points:
        out = tmp_path / f"export-{p.id}.raw"
        export_point(st, cat, p, "raw", out)
        assert same_file(out, snaps[p.id]), f"point {p.id}"


def test_a_crash_between_manifests_and_commit_leaves_harmless_garbage(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from hotspare.extentlog import Extent, write_log
    from hotspare.versioned import latest_version

    st = open_store(str(tmp_path / "store"))
    image = tmp_path / "disk.img"
    random_image(image, 8 << 20)
    cfg = MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")])
    save_machine(st, cfg, create_only=True)
    for seq in range(segments.MANIFEST_LOGS + 6):
        path = tmp_path / "log.parquet"
        write_log(str(path), [Extent(seq=seq, offset=seq * 4096, length=4096, data=os.urandom(4096))],
                  machine="m1", disk="root", epoch=0, disk_size=8 << 20)
        st.put_file(layout.log_key("m1", "root", 0, seq, seq), str(path), create_only=True)
    code = ("from hotspare.ingest import ingest_disk; from hotspare.machine import load_machine; "
            f"from hotspare.store import open_store; s = open_store({st.url!r}); "
            "ingest_disk(s, 'm1', load_machine(s, 'm1').disks[0])")
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True,
                       env={**os.environ, "HOTSPARE_CRASH_AT": "catalog-before-commit"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    orphans = {o.key for o in st.list(layout.manifests_prefix("m1", "root"))}
    assert orphans and latest_version(st, layout.catalog_prefix("m1", "root")) is None
    cat, _ = ingest_disk(st, "m1", cfg.disks[0])
    assert [lg.first_seq for lg in catalog_logs(st, cat)] == list(range(segments.MANIFEST_LOGS + 6))
    assert sweep_manifests(st, cat) == len(orphans - {m.key for m in cat.manifests})
    assert {o.key for o in st.list(layout.manifests_prefix("m1", "root"))} == {m.key for m in cat.manifests}
    assert catalog_logs(st, load_catalog(st, "m1", "root", 8 << 20)) == catalog_logs(st, cat)
