"""Findings of the reliability issue (#11): each test reproduces one fault first.

Tests of the engine run without Prefect; the CLI ones run the ``hotspare`` command as a
user would. Clock skew is simulated by writing heartbeats and logs with skewed timestamps.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.errors import UsageError
from tests.helpers import HOTSPARE, cli, random_image, sha256_file

SIZE = 8 << 20


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    for bad in ("x\n", "x\r\n", "x\n\n", "\nx"):
        with pytest.raises(UsageError, match="name"):
            layout.check_name("machine", bad)
    assert layout.check_name("machine", "x") == "x"
    image = tmp_path / "disk.img"
    random_image(image, SIZE)
    r = cli("protect", "x\n", "--disk", f"root={image}", "--store", str(tmp_path / "store"), check=False)
    assert r.returncode != 0 and "invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "store" / "machines").exists() or not any((tmp_path / "store" / "machines").iterdir())


@pytest.mark.parametrize("kib", ["-64", "3", str(2**40), "0", "32768"])
def test_a_bad_block_size_is_one_line_and_exit_2(tmp_path: Path, kib: str) -> None:
    image = tmp_path / "disk.img"
    random_image(image, SIZE)
    r = cli("protect", "m1", "--disk", f"root={image}", "--block-size-kib", kib, "--store", str(tmp_path / "store"),
            check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and "power of two" in r.stderr, r.stderr
    assert not (tmp_path / "store" / "machines" / "m1").exists()


def _one_line_error(r) -> str:
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str = "1m"):
    """A directory on a file system of ``size`` (a tmpfs), so writes run out of space; None
    when this process may not mount (then the caller limits the file size instead)."""
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                       check=False)
    if r.returncode != 0:
        yield None
        return
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def _consolidated(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A protected machine with one recovery point; (its disk image, the CLI environment)."""
    image = tmp_path / "disk.img"
    random_image(image, SIZE, fill=0.6)
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_TRACKER": "scan"}  # the image is written directly, not through the daemon
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    return image, env


def test_cli_faults_are_one_line_errors(tmp_path: Path, prefect_api: str) -> None:
    _, env = _consolidated(tmp_path)
    line = _one_line_error(cli("consolidate", "m1", "--policy-block", "nope", env=env, check=False))
    assert "nope" in line and "policy" in line, line

    # A full file system: one line naming the file, and no temp file left behind.
    with tiny_filesystem(tmp_path / "full") as full:
        if full is None:
            if os.environ.get("CI", "").lower() == "true" and os.geteuid() == 0:
                pytest.fail("cannot mount a tmpfs as root")
            full = tmp_path / "full"
            limit = {"preexec_fn": _limit_file_size(1 << 20)}
        else:
            limit = {}
        out = full / "m1.raw"
        r = _run_cli(["export", "m1", "--disk", "root", "--out", str(out), "--format", "raw"], env, **limit)
        line = _one_line_error(r)
        assert str(out) in line and "cannot write" in line, line
        assert list(full.iterdir()) == [], list(full.iterdir())


def _limit_file_size(limit: int):
    def set_limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return set_limit


def _run_cli(args: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([HOTSPARE, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env}, check=False, **kw)


def test_export_never_overwrites_a_disk_of_the_machine(tmp_path: Path, prefect_api: str) -> None:
    image, env = _consolidated(tmp_path)
    before = sha256_file(image)
    line = _one_line_error(cli("export", "m1", "--disk", "root", "--out", str(image), "--format", "raw",
                               env=env, check=False))
    assert str(image) in line and "protected" in line, line
    link = tmp_path / "alias.img"
    link.symlink_to(image)
    _one_line_error(cli("export", "m1", "--disk", "root", "--out", str(link), "--format", "raw", env=env, check=False))
    assert sha256_file(image) == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_resized_disk_is_told_a_way_that_works(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, SIZE)
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_TRACKER": "scan"}  # the image is written directly, not through the daemon
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    with open(image, "r+b") as f:
        f.truncate(2 * SIZE)
    line = _one_line_error(cli("agent", "m1", "--once", env=env, check=False))
    assert "re-protect" in line, line
    line = _one_line_error(cli("protect", "m1", "--disk", f"root={image}", env=env, check=False))
    assert "hotspare protect m1-2 --disk root=" in line, line
    # What the message says works.
    command = line.split("hotspare protect ", 1)[1].split(" (then", 1)[0].split()
    cli("protect", *command, env=env)
    r = cli("agent", "m1-2", "--once", env=env)
    assert "shipped 1 log(s)" in r.stdout or "shipped" in r.stdout, r.stdout
    from hotspare.machine import load_machine
    from hotspare.store import open_store

    assert load_machine(open_store(env["HOTSPARE_STORE"]), "m1-2").disks[0].size == 2 * SIZE


# -- finding 3: every read of accepted data checks the rows' checksums ---------------------

def flip_a_data_bit(path: Path, row: int | None = None) -> int:
    """Rewrite the log at ``path`` with one bit of one row's data flipped and its checksums
    left as they were (a data page damaged at rest that still decodes); returns that row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hotspare.extentlog.schema import SCHEMA

    pf = pq.ParquetFile(path)
    table = pf.read()
    data = table.column("data").to_pylist()
    if row is None:
        row = next(i for i, d in enumerate(data) if d is not None and any(d))
    d = bytearray(data[row])
    d[len(d) // 2] ^= 0x01
    data[row] = bytes(d)
    table = table.set_column(table.schema.get_field_index("data"), "data", pa.array(data, pa.large_binary()))
    table = pa.Table.from_arrays(table.columns, schema=SCHEMA).replace_schema_metadata(pf.metadata.metadata)
    tmp = path.with_name(path.name + ".new")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return row


def test_replay_and_export_check_row_checksums(tmp_path: Path) -> None:
    from hotspare.errors import InvalidLog
    from hotspare.extentlog import Extent, write_log
    from hotspare.replay import apply_log
    from hotspare.store import open_store

    st = open_store(str(tmp_path / "store"))
    key = layout.log_key("m1", "root", 0, 0, 2)
    path = tmp_path / "store" / key
    path.parent.mkdir(parents=True)
    write_log(str(path), [Extent(seq=i, offset=i << 20, length=65536, data=bytes([i + 1]) * 65536) for i in range(3)],
              machine="m1", disk="root", epoch=0, disk_size=SIZE)
    flip_a_data_bit(path, row=2)
    out = tmp_path / "out.raw"
    with open(out, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(out, os.O_WRONLY)
    try:
        with pytest.raises(InvalidLog, match="row 2: checksum mismatch") as err:
            apply_log(st, key, fd)
    finally:
        os.close(fd)
    assert err.value.key == key and err.value.row == 2


def _logs(env: dict[str, str]):
    from hotspare.catalog import catalog_logs
    from hotspare.store import open_store

    return catalog_logs(open_store(env["HOTSPARE_STORE"]), _catalog(env))


def _catalog(env: dict[str, str]):
    from hotspare.catalog import load_catalog
    from hotspare.store import open_store

    return load_catalog(open_store(env["HOTSPARE_STORE"]), "m1", "root", SIZE)


def _assert_export_is_the_disk(tmp_path: Path, env: dict[str, str], image: Path) -> None:
    out = tmp_path / "export.raw"
    cli("export", "m1", "--disk", "root", "--out", str(out), "--format", "raw", env=env)
    assert sha256_file(out) == sha256_file(image), "the newest point differs from the disk"


def _changed_and_ingested(image: Path, env: dict[str, str]) -> str:
    """Write to the disk, ship and ingest it; the new accepted log's key."""
    from tests.helpers import qemu_io

    before = {lg.key for lg in _logs(env)}
    qemu_io(image, "write -P 0x5a 0 65536", "write -P 0xa5 1048576 131072", "write -P 0x33 4194304 65536")
    cli("agent", "m1", "--once", env=env)
    cli("ingest", "m1", env=env)
    new = [lg.key for lg in _logs(env) if lg.key not in before]
    assert len(new) == 1, new
    return new[0]


def test_consolidation_checks_row_checksums_and_asks_for_a_resync(tmp_path: Path, prefect_api: str) -> None:
    image, env = _consolidated(tmp_path)
    key = _changed_and_ingested(image, env)
    store_root = Path(env["HOTSPARE_STORE"])
    row = flip_a_data_bit(store_root / key)
    before = _catalog(env)

    line = _one_line_error(cli("consolidate", "m1", env=env, check=False))
    assert key in line and f"row {row}" in line and "checksum" in line, line
    after = _catalog(env)
    assert after.points == before.points, "no point made from a damaged log"
    assert after.resync_from == before.applied_seq(0) + 1 and key not in {lg.key for lg in _logs(env)}
    assert (store_root / layout.quarantine_key(key)).is_file() and not (store_root / key).exists()
    assert "resync" in line

    r = cli("agent", "m1", "--once", env=env)
    assert "(resync)" in r.stdout, r.stdout
    cli("consolidate", "m1", env=env)
    assert _catalog(env).resync_from is None
    _assert_export_is_the_disk(tmp_path, env, image)


# -- finding 8: a way back from a missing or damaged object --------------------------------

def test_a_deleted_accepted_log_asks_for_a_resync(tmp_path: Path, prefect_api: str) -> None:
    image, env = _consolidated(tmp_path)
    key = _changed_and_ingested(image, env)
    (Path(env["HOTSPARE_STORE"]) / key).unlink()
    before = _catalog(env)
    line = _one_line_error(cli("consolidate", "m1", env=env, check=False))
    assert key in line and "missing" in line and "resync" in line, line
    after = _catalog(env)
    assert after.points == before.points and after.resync_from == before.applied_seq(0) + 1
    assert "(resync)" in cli("agent", "m1", "--once", env=env).stdout
    cli("consolidate", "m1", env=env)
    _assert_export_is_the_disk(tmp_path, env, image)


def _truncate(env: dict[str, str], what: str) -> str:
    """Cut the current point's index root or its first pack in half; returns its key."""
    from hotspare.replica.index import read_root
    from hotspare.store import open_store

    cat = _catalog(env)
    root_key = cat.point("current").root
    key = root_key if what == "root" else next(iter(read_root(open_store(env["HOTSPARE_STORE"]), root_key).packs.values())).key
    path = Path(env["HOTSPARE_STORE"]) / key
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    return key


def test_a_damaged_current_index_is_rebuilt_from_the_previous_point(tmp_path: Path, prefect_api: str) -> None:
    from tests.helpers import qemu_io

    image, env = _consolidated(tmp_path)
    _changed_and_ingested(image, env)
    cli("consolidate", "m1", env=env)
    cat = _catalog(env)
    assert len(cat.points) == 2
    damaged = cat.point("current")
    key = _truncate(env, "root")
    qemu_io(image, "write -P 0x77 2097152 65536")
    cli("agent", "m1", "--once", env=env)
    r = cli("consolidate", "m1", env=env)
    assert "point 0-" in r.stdout and key in r.stdout + r.stderr, r.stdout + r.stderr
    cat = _catalog(env)
    assert damaged.id not in [p.id for p in cat.points] and all(p.root != key for p in cat.points)
    _assert_export_is_the_disk(tmp_path, env, image)


def test_a_damaged_pack_names_itself_and_asks_for_a_resync(tmp_path: Path, prefect_api: str) -> None:
    image, env = _consolidated(tmp_path)
    key = _truncate(env, "pack")
    _changed_and_ingested(image, env)
    line = _one_line_error(cli("consolidate", "m1", env=env, check=False))
    assert key in line and "resync" in line and "agent" in line, line
    assert not _catalog(env).points, "the point that read from the lost pack is dropped"
    assert "(resync)" in cli("agent", "m1", "--once", env=env).stdout
    r = cli("consolidate", "m1", env=env)
    assert "point 0-" in r.stdout, r.stdout
    _assert_export_is_the_disk(tmp_path, env, image)


# -- findings 4 and 5: time that decides anything is the store's or the ingest's ----------

def _protected(tmp_path: Path, st) -> None:
    from hotspare.machine import MachineConfig, parse_disk_arg, save_machine

    image = tmp_path / "disk.img"
    random_image(image, SIZE)
    save_machine(st, MachineConfig(name="m1", disks=[parse_disk_arg(f"root={image}")]), create_only=True)


def _skewed_heartbeat(st, skew: timedelta) -> None:
    """A heartbeat as an agent whose clock is ``skew`` off would write it."""
    import json

    from hotspare.catalog.model import utcnow

    doc = {"machine": "m1", "mode": "normal", "epoch": 0, "time": (utcnow() + skew).isoformat(), "disks": {}}
    st.put(layout.heartbeat_key("m1"), json.dumps(doc).encode())


def test_a_live_machine_with_a_slow_clock_is_not_failed_over(tmp_path: Path, store) -> None:
    from hotspare.status import machine_status
    from hotspare.errors import MachineLive
    from hotspare.failover import check_silent
    from hotspare.machine import load_machine
    from hotspare.state import load_state

    _protected(tmp_path, store)
    _skewed_heartbeat(store, -timedelta(minutes=10))  # sent just now, by a clock 10 min slow
    cfg = load_machine(store, "m1")
    with pytest.raises(MachineLive, match="refusing"):
        check_silent(store, cfg, load_state(store, "m1"))
    hb = machine_status(store, "m1")["heartbeat"]
    assert hb["fresh"] and hb["age_seconds"] < 30 and hb["clock_skewed"], hb
    assert -620 < hb["clock_skew_seconds"] < -580, hb


def test_a_dead_machine_with_a_fast_clock_is_silent(tmp_path: Path) -> None:
    from hotspare.status import machine_status
    from hotspare.failover import check_silent
    from hotspare.machine import load_machine
    from hotspare.state import load_state
    from hotspare.store import open_store

    st = open_store(str(tmp_path / "store"))
    _protected(tmp_path, st)
    _skewed_heartbeat(st, timedelta(days=1))
    # ... and the store received it 10 minutes ago (the machine died since).
    old = time.time() - 600
    os.utime(tmp_path / "store" / layout.heartbeat_key("m1"), (old, old))
    silence = check_silent(st, load_machine(st, "m1"), load_state(st, "m1"))
    assert "last heartbeat 600s ago" in silence or "last heartbeat 599s ago" in silence, silence
    hb = machine_status(st, "m1")["heartbeat"]
    assert not hb["fresh"] and 590 < hb["age_seconds"] < 620 and hb["clock_skewed"], hb


def _ship(st, first: int, n: int, ts: datetime, fill: int) -> None:
    """An agent's cycle of ``n`` writes stamped ``ts`` (a skewed clock), one log, a cut."""
    import tempfile

    from hotspare.extentlog import Extent, write_log

    with tempfile.NamedTemporaryFile(suffix=".parquet") as f:
        write_log(f.name, [Extent(seq=first + i, offset=i << 16, length=65536, data=bytes([fill]) * 65536, ts=ts)
                           for i in range(n)], machine="m1", disk="root", epoch=0, disk_size=SIZE)
        st.put_file(layout.log_key("m1", "root", 0, first, first + n - 1), f.name, create_only=True)


def _consolidate_here(st) -> None:
    """Ingest, then make the new current point, with the engine alone."""
    from hotspare.ingest import ingest_disk
    from hotspare.machine import Policy, load_machine
    from hotspare.replica.consolidate import consolidate_disk

    disk = load_machine(st, "m1").disks[0]
    ingest_disk(st, "m1", disk)
    assert consolidate_disk(st, "m1", disk, Policy()).point is not None


def test_retention_and_points_use_the_accepted_time_not_ts(tmp_path: Path) -> None:
    from hotspare.catalog import load_catalog
    from hotspare.catalog.model import utcnow
    from hotspare.status import machine_status
    from hotspare.consolidate.export import find_point
    from hotspare.replica.gc import kept_points
    from hotspare.machine import Policy
    from hotspare.store import open_store

    st = open_store(str(tmp_path / "store"))
    _protected(tmp_path, st)
    t0 = utcnow()
    # The agent's clock 2 days slow: every point is young, and all are kept.
    for i in range(3):
        _ship(st, 3 * i, 3, utcnow() - timedelta(days=2), fill=i + 1)
        _consolidate_here(st)
    cat = load_catalog(st, "m1", "root", SIZE)
    assert len(cat.points) == 3 and all(p.time >= t0 for p in cat.points), [p.time for p in cat.points]
    assert len(kept_points(cat, Policy(retention_points=24, retention_hours=24))) == 3
    # Then 2 days fast: --at now still finds the newest point, and the lag is not negative.
    _ship(st, 9, 3, utcnow() + timedelta(days=2), fill=9)
    _consolidate_here(st)
    cat = load_catalog(st, "m1", "root", SIZE)
    assert find_point(cat, at=utcnow()).id == cat.point("current").id == "0-11"
    assert machine_status(st, "m1")["disks"]["root"]["lag_seconds"] >= 0


# -- finding 9: transient store errors are retried at the store boundary ------------------

def test_catalog_and_machine_reads_survive_truncated_bodies(tmp_path: Path, s3_env) -> None:
    import uuid

    from hotspare.catalog import load_catalog
    from hotspare.machine import load_machine
    from hotspare.store import open_store
    from hotspare.store.s3 import S3Store
    from tests.faultproxy import FaultProxy, Rule

    bucket = f"hotspare-test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=bucket)
    direct = open_store(f"s3://{bucket}/root")
    _protected(tmp_path, direct)
    for i in range(2):
        _ship(direct, 3 * i, 3, datetime.now().astimezone(), fill=i + 1)
        _consolidate_here(direct)
    want_cfg, want_cat = load_machine(direct, "m1"), load_catalog(direct, "m1", "root", SIZE)

    proxy = FaultProxy(s3_env.endpoint_url)
    try:
        st = S3Store(bucket, "root", endpoint_url=proxy.url)
        # Every read a flow makes outside its tasks, each cut short twice (botocore does not
        # retry a body cut short after its headers), a listing reset, heads throttled.
        proxy.rules = [Rule("GET", "machine.json", "truncate", 2), Rule("GET", "catalog/HEAD", "truncate", 2),
                       Rule("GET", "catalog/00000", "truncate", 2), Rule("GET", "list-type=2", "truncate", 2),
                       Rule("GET", "list-type=2", "reset", 2), Rule("HEAD", "heartbeat", "503", 8)]
        assert load_machine(st, "m1") == want_cfg
        assert load_catalog(st, "m1", "root", SIZE) == want_cat
        st.put(layout.heartbeat_key("m1"), b"{}")
        assert st.stat(layout.heartbeat_key("m1")).size == 2
        assert proxy.faults >= 10, proxy.rules
        # A create-only write whose answer is lost after the server acted is still ours.
        proxy.rules = [Rule("PUT", "state/00000", "truncate", 1)]
        st.put(layout.state_key("m1", 1), b'{"x": 1}', create_only=True)
        assert direct.get(layout.state_key("m1", 1)) == b'{"x": 1}'
        st.close()
    finally:
        proxy.close()


# -- finding 12: a failed failover stops the VM it launched -----------------------------

def _qemus(vm_id: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", f"guest={vm_id}"], capture_output=True, text=True,
                          check=False).stdout.split()


def _protect_broken_demo(tmp_path: Path, demo_disk: Path) -> dict[str, str]:
    with open(demo_disk, "r+b") as f:
        f.write(bytes(440))  # the MBR's boot code: the BIOS finds nothing to boot
    env = {"HOTSPARE_STORE": str(tmp_path / "store"), "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_VM_DIR": str(tmp_path / "vms")}
    cli("protect", "demo", "--disk", f"root={demo_disk}", "--heartbeat-window", "10", env=env)
    cli("agent", "demo", "--once", "--quiet", env=env)
    time.sleep(11)  # silent for longer than the window
    return env


def test_a_failover_that_fails_after_the_launch_stops_its_vm(tmp_path: Path, demo_disk: Path,
                                                             prefect_api: str) -> None:
    from hotspare.state import load_state
    from hotspare.store import open_store
    from hotspare.vm.host import load_handle

    env = _protect_broken_demo(tmp_path, demo_disk)
    r = cli("failover", "demo", "--approve", "--boot-timeout", "15", env=env, check=False)
    handle = load_handle(tmp_path / "vms" / "demo")
    try:
        line = _one_line_error(r)
        assert r.returncode == 6, r.returncode  # VmFailed
        assert handle is not None and handle.vm_id in line and "stopped" in line and "no marker" in line, line
        assert _qemus(handle.vm_id) == [], "the failed failover's VM still runs"
        state = load_state(open_store(env["HOTSPARE_STORE"]), "demo")
        assert state.state == "failing-over" and state.step == "boot-failed" and state.vm is None, state
    finally:
        if handle is not None and _qemus(handle.vm_id):
            cli("vm", "stop", "demo", env=env, check=False)


def test_vm_stop_stops_the_vm_of_an_unfinished_failover(tmp_path: Path, demo_disk: Path, prefect_api: str) -> None:
    from hotspare.state import load_state
    from hotspare.store import open_store
    from hotspare.vm.host import load_handle

    env = _protect_broken_demo(tmp_path, demo_disk)
    r = cli("failover", "demo", "--approve", env={**env, "HOTSPARE_CRASH_AT": "failover-after-launch"}, check=False)
    assert r.returncode == -signal.SIGKILL, r.stderr
    handle = load_handle(tmp_path / "vms" / "demo")
    assert handle is not None and _qemus(handle.vm_id), "the crashed failover left its VM running"
    try:
        r = cli("vm", "stop", "demo", env=env)
        assert "unfinished failover" in r.stdout, r.stdout
        assert _qemus(handle.vm_id) == []
        assert load_state(open_store(env["HOTSPARE_STORE"]), "demo").state == "failing-over"
    finally:
        if _qemus(handle.vm_id):
            subprocess.run(["kill", "-9", *_qemus(handle.vm_id)], check=False)
