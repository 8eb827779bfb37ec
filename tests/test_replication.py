"""The replication data path end to end, on both stores, through the CLI and a real
Prefect server: protect, agent, outside writes, agent, ingest; bad logs quarantined."""

from __future__ import annotations

import contextvars
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hotspare import layout
from hotspare.catalog import Fence, accepted_keys, catalog_logs, commit_catalog, load_catalog
from hotspare.extentlog import Extent, write_log
from hotspare.extentlog.schema import META_KEY
from hotspare.replay import replay_catalog
from hotspare.versioned import latest_version
from tests.helpers import cli, qemu_io, random_image, same_file

pytestmark = pytest.mark.usefixtures("prefect_api")

SIZE = 48 << 20


def protect(tmp_path: Path, store_url: str) -> tuple[Path, dict[str, str]]:
    image = tmp_path / "disk.img"
    random_image(image, SIZE, seed=3)
    env = {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_TRACKER": "scan"}  # the image is written directly, not through the daemon
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    return image, env


def random_writes(image: Path, n: int = 12, seed: int = 5) -> None:
    import random

    rng = random.Random(seed)
    cmds = []
    for _ in range(n):
        length = rng.choice([512, 4096, 65536, 300 * 1024, 1 << 20])
        off = rng.randrange(0, SIZE - length) // 512 * 512
        cmds.append(f"write -z {off} {length}" if rng.random() < 0.2 else f"write -P {rng.randrange(1, 256)} {off} {length}")
    qemu_io(image, *cmds)


def check_replica(store, image: Path, tmp_path: Path):
    cat = load_catalog(store, "m1", "root", SIZE)
    replica = tmp_path / "replica.raw"
    replay_catalog(store, cat, replica)
    assert same_file(image, replica), "the accepted logs replayed over zeros must equal the image"
    return cat


def test_protect_agent_writes_agent_ingest(tmp_path: Path, store_url: str, store) -> None:
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    random_writes(image)
    cli("agent", "m1", "--once", env=env)
    r = cli("ingest", "m1", env=env)
    assert "accepted 2 log(s)" in r.stdout and "rejected 0" in r.stdout
    cat = check_replica(store, image, tmp_path)
    assert cat.version == 1 and len(catalog_logs(store, cat)) == 2
    # Nothing new: a second ingest commits nothing.
    cli("ingest", "m1", env=env)
    assert latest_version(store, layout.catalog_prefix("m1", "root")) == 1
    hb = store.get(layout.heartbeat_key("m1"))
    assert b'"mode": "normal"' in hb


def log_bytes(exts: list[Extent], *, format_version: int | None = None) -> bytes:
    """A log's bytes, as the agent would write them (optionally claiming another version)."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "log.parquet"
        write_log(str(path), exts, machine="m1", disk="root", epoch=0, disk_size=SIZE)
        if format_version is not None:
            pf = pq.ParquetFile(path)
            meta = json.loads(pf.metadata.metadata[META_KEY])
            meta["format_version"] = format_version
            table = pf.read().replace_schema_metadata({META_KEY: json.dumps(meta)})
            pq.write_table(table, path)
        return path.read_bytes()


def _bad_logs(store, applied: int) -> dict[str, str]:
    """Five bad logs, each at its own seqs; returns key -> the reason ingest must give."""
    rnd = os.urandom(4096)  # incompressible: a flipped byte stays in the data bytes

    def ext(seq: int, off: int = 0, length: int = 4096) -> Extent:
        return Extent(seq=seq, offset=off, length=length, data=rnd[:length])

    def put(exts: list[Extent], data: bytes) -> str:
        key = layout.log_key("m1", "root", 0, exts[0].seq, exts[-1].seq)
        store.put(key, data, create_only=True)
        return key

    def flip(data: bytes) -> bytes:
        b = bytearray(data)
        b[b.find(rnd[:64]) + 100] ^= 1
        return bytes(b)

    a = applied + 1
    bad = {}
    e = [ext(a)]
    bad[put(e, flip(log_bytes(e)))] = "row 0: checksum mismatch"
    e = [ext(a + 10)]
    bad[put(e, log_bytes(e)[:-200])] = "not a readable Parquet file (truncated or corrupt)"
    e = [ext(a + 20, off=SIZE - 512)]
    bad[put(e, log_bytes(e))] = "ends past the disk's end"
    e = [ext(applied - 1), ext(applied)]
    bad[put(e, log_bytes(e))] = "overlap the accepted seqs"
    e = [ext(a + 30)]
    bad[put(e, log_bytes(e, format_version=2))] = "unknown format version 2"
    return bad


def test_bad_logs_are_quarantined_and_nothing_committed_is_touched(tmp_path: Path, store_url: str, store) -> None:
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    cli("ingest", "m1", env=env)
    cat1 = load_catalog(store, "m1", "root", SIZE)
    committed = {k: store.get(k) for k in [layout.catalog_key("m1", "root", 1), *accepted_keys(store, cat1)]}

    bad = _bad_logs(store, cat1.applied_seq(0))
    r = cli("ingest", "m1", env=env, check=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("rejected: ")]
    assert len(lines) == len(bad), r.stderr
    for key, reason in bad.items():
        line = next(ln for ln in lines if key in ln)
        assert reason in line, line
        assert not store.exists(key)
        assert store.exists(layout.quarantine_key(key))
        assert reason in store.get(layout.quarantine_reason_key(key)).decode()
    for k, v in committed.items():
        assert store.get(k) == v, f"{k} changed"
    cat2 = load_catalog(store, "m1", "root", SIZE)
    assert cat2.applied_seq(0) == cat1.applied_seq(0) and catalog_logs(store, cat2) == catalog_logs(store, cat1)
    assert len(cat2.rejected) == len(bad)
    # The checksum-mismatch log held the next seqs: a hole the agent must close by resync.
    assert cat2.resync_from == cat1.applied_seq(0) + 1

    random_writes(image, seed=9)
    r = cli("agent", "m1", "--once", env=env)
    assert "(resync)" in r.stdout
    cli("ingest", "m1", env=env)
    cat3 = check_replica(store, image, tmp_path)
    assert cat3.resync_from is None


def test_late_logs_of_a_fenced_epoch_are_quarantined(tmp_path: Path, store_url: str, store) -> None:
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    cli("ingest", "m1", env=env)
    cat = load_catalog(store, "m1", "root", SIZE)
    commit_catalog(store, cat.next(epoch=1, fences=[Fence(epoch=0, after_seq=cat.applied_seq(0), reason="failover")]))
    late = layout.log_key("m1", "root", 0, cat.applied_seq(0) + 1, cat.applied_seq(0) + 1)
    store.put(late, log_bytes([Extent(seq=cat.applied_seq(0) + 1, offset=0, length=512, data=b"z" * 512)]),
              create_only=True)
    r = cli("ingest", "m1", env=env, check=False)
    assert r.returncode == 1 and "is fenced after seq" in r.stderr
    assert store.exists(layout.quarantine_key(late))
    assert load_catalog(store, "m1", "root", SIZE).applied_seq(0) == cat.applied_seq(0)


def test_racing_ingests_commit_each_version_once(tmp_path: Path, store) -> None:
    from flows.ingest import ingest

    image, env = protect(tmp_path, store.url)
    cli("agent", "m1", "--once", "--log-target-mib", "4", env=env)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(ingest(machine="m1", store=store.url))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    # Threads do not inherit context variables, where Prefect keeps its settings.
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(run,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    cat = load_catalog(store, "m1", "root", SIZE)
    keys = [log.key for log in catalog_logs(store, cat)]
    assert len(keys) == len(set(keys)), "a log accepted twice"
    assert sorted(keys) == sorted(o.key for o in store.list(layout.logs_prefix("m1", "root", 0)))
    # Every version is a whole commit, each extending the previous one.
    from hotspare.catalog import Catalog
    from hotspare.versioned import load

    prev = None
    for v in range(1, cat.version + 1):
        c = load(store, layout.catalog_prefix("m1", "root"), v, Catalog)
        if prev is not None:
            logs, prev_logs = catalog_logs(store, c), catalog_logs(store, prev)
            assert logs[: len(prev_logs)] == prev_logs
        prev = c
    check_replica(store, image, tmp_path)


def test_ingest_killed_before_commit_converges(tmp_path: Path, store_url: str, store) -> None:
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    r = cli("ingest", "m1", env={**env, "HOTSPARE_CRASH_AT": "ingest-before-commit"}, check=False)
    assert r.returncode < 0
    assert latest_version(store, layout.catalog_prefix("m1", "root")) is None
    cli("ingest", "m1", env=env)
    check_replica(store, image, tmp_path)


def test_heartbeat_event_reaches_prefect(tmp_path: Path, prefect_api: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    image, env = protect(tmp_path, str(tmp_path / "store"))
    cli("agent", "m1", "--once", env=env)
    flt = EventFilter(event=EventNameFilter(name=["hotspare.machine.heartbeat"]),
                      resource=EventResourceFilter(id=["hotspare.machine.m1"]))
    deadline = time.monotonic() + 30
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(filter=flt, limit=10)
            if page.events or time.monotonic() > deadline:
                break
            time.sleep(1)
    assert page.events, "no heartbeat event reached the Prefect server"
    ev = page.events[0]
    assert ev.resource["hotspare.mode"] == "normal" and ev.resource["hotspare.epoch"] == "0"
    assert ev.payload["disks"]["root"]["last_seq"] >= 0


def test_corrupt_catalog_and_machine_files_give_one_line_errors(tmp_path: Path, store_url: str, store) -> None:
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    cli("ingest", "m1", env=env)
    store.put(layout.catalog_key("m1", "root", 2), b'{"machine": "m1", "disk": "root", "version": "two"}', create_only=True)
    r = cli("ingest", "m1", env=env, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    assert "catalog/00000000000000000002.json: invalid Catalog: version" in r.stderr
    store.put(layout.machine_key("m1"), b'{"name": "m1", "disks": []}')
    r = cli("agent", "m1", "--once", env=env, check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "machines/m1/machine.json: disks: List should have at least 1 item" in r.stderr


def test_batched_ingest_accepts_the_good_logs_and_quarantines_the_bad(tmp_path: Path, store) -> None:
    """140 good logs and three bad ones: validated a batch per task, the good accepted (the
    older ones into manifests), the bad quarantined with their reasons."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.ingest import ingest
    from hotspare.ingest import BATCH_LOGS

    protect(tmp_path, store.url)
    expected = tmp_path / "expected.raw"
    with open(expected, "wb") as f:
        f.truncate(SIZE)
    for seq in range(140):
        data = os.urandom(4096)
        e = [Extent(seq=seq, offset=seq * 8192, length=4096, data=data)]
        store.put(layout.log_key("m1", "root", 0, seq, seq), log_bytes(e), create_only=True)
        with open(expected, "r+b") as f:
            f.seek(seq * 8192)
            f.write(data)
    rnd = os.urandom(4096)
    flipped = bytearray(log_bytes([Extent(seq=1000, offset=0, length=4096, data=rnd)]))
    flipped[flipped.find(rnd[:64]) + 100] ^= 1
    bad = {layout.log_key("m1", "root", 0, 1000, 1000): (bytes(flipped), "row 0: checksum mismatch"),
           layout.log_key("m1", "root", 0, 2000, 2000): (log_bytes([Extent(seq=2000, offset=0, length=512,
                                                                          data=b"x" * 512)])[:-100],
                                                         "not a readable Parquet file"),
           layout.log_key("m1", "root", 0, 5, 6): (log_bytes([Extent(seq=5, offset=0, length=512, data=b"y" * 512),
                                                              Extent(seq=6, offset=512, length=512, data=b"y" * 512)]),
                                                   "overlap the accepted seqs")}
    for key, (data, _) in bad.items():
        store.put(key, data, create_only=True)

    state = ingest(machine="m1", store=store.url, return_state=True)
    result = state.result()
    assert len(result.disks[0].accepted) == 140
    assert {r.key: r.detail for r in result.rejected}.keys() == bad.keys()
    for r in result.rejected:
        assert bad[r.key][1] in r.detail, r
        assert not store.exists(r.key) and store.exists(layout.quarantine_key(r.key))
    cat = check_replica(store, expected, tmp_path)
    assert cat.applied_seq(0) == 139 and cat.manifests and len(catalog_logs(store, cat)) == 140
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    validations = [t for t in runs if t.name.startswith("validate ")]
    assert len(validations) == -(-143 // BATCH_LOGS), [t.name for t in runs]
    # The next ingest lists only after the newest accepted log: nothing new, nothing committed.
    again = ingest(machine="m1", store=store.url)
    assert again.disks[0].catalog_version == cat.version and not again.disks[0].accepted
