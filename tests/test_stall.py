"""No silent stall (issue 11): every way protection stops moving shows in ``hotspare status``
(exit 3, one line per machine), in the heartbeat, and as a ``hotspare.machine.stalled``
event; and the agent waits out a SeaweedFS that went away, with nothing lost.

Ages are the store's: on a local store a log's or heartbeat's age is its file's mtime, so a
test ages an object by moving its mtime back, as time passing would.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from hotspare import layout
from hotspare.catalog import load_catalog
from hotspare.replay import replay_catalog
from hotspare.store import open_store
from tests.helpers import HOTSPARE, cli, qemu_io, random_image, same_file

SIZE = 8 << 20
EXIT_STALLED = 3


def _protect(tmp_path: Path, store_url: str, window: int = 10, **env_extra: str) -> tuple[Path, dict[str, str]]:
    image = tmp_path / "disk.img"
    random_image(image, SIZE, seed=4)
    env = {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"),
           "HOTSPARE_TRACKER": "scan", **env_extra}  # the image is written directly, not through a daemon
    cli("protect", "m1", "--disk", f"root={image}", "--heartbeat-window", str(window), env=env)
    return image, env


def _age(store_root: Path, key: str, seconds: float) -> None:
    """Move a local store object's mtime (its store time) ``seconds`` into the past."""
    path = store_root / key
    t = time.time() - seconds
    os.utime(path, (t, t))


def _status(env: dict[str, str]) -> tuple[int, dict, str]:
    """(exit code, status --json, the human status's output)."""
    r = cli("status", "m1", "--json", env=env, check=False)
    human = cli("status", "m1", env=env, check=False)
    assert "Traceback" not in r.stderr + human.stderr, r.stderr + human.stderr
    assert r.returncode == human.returncode, (r.returncode, human.returncode)
    return r.returncode, json.loads(r.stdout), human.stdout


def _stall_line(human: str) -> str:
    lines = [ln for ln in human.splitlines() if ln.startswith("m1: STALLED: ")]
    assert len(lines) == 1, human
    return lines[0]


def _events(name: str, since, machine: str = "m1", want: int = 1, timeout: float = 30):
    """The events ``name`` about ``machine`` since ``since`` (other tests use the name too)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    flt = EventFilter(event=EventNameFilter(name=[name]), occurred=EventOccurredFilter(since=since),
                      resource=EventResourceFilter(id=[f"hotspare.machine.{machine}"]))
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_events(filter=flt, limit=50)
            if len(page.events) >= want or time.monotonic() > deadline:
                return page.events
            time.sleep(1)


def test_a_lost_log_stalls_then_resyncs_and_every_stall_is_said(tmp_path: Path, prefect_api: str) -> None:
    began = _now()
    root = tmp_path / "store"
    image, env = _protect(tmp_path, str(root), window=60)  # a loaded machine's flow runs outlast 10 s
    st = open_store(str(root))
    cli("agent", "m1", "--once", env=env)
    cli("ingest", "m1", env=env)
    code, status, _ = _status(env)
    assert code == 0 and status["stalled"] is False and status["stalls"] == [], status

    # Two more logs; the first is lost (deleted before any ingest saw it): a gap.
    qemu_io(image, "write -P 0x41 1M 64k")
    cli("agent", "m1", "--once", env=env)
    qemu_io(image, "write -P 0x42 3M 64k")
    cli("agent", "m1", "--once", env=env)
    cat = load_catalog(st, "m1", "root", SIZE)
    logs = sorted(o.key for o in st.list(layout.logs_prefix("m1", "root", 0), start_after=cat.newest[0]))
    assert len(logs) == 2, logs
    st.delete(logs[0])
    # Within the window the gap may be a log still on its way: not a stall yet.
    assert _status(env)[0] == 0
    # Waited on for longer than the heartbeat window, it is.
    _age(root, logs[1], 120)
    code, status, human = _status(env)
    assert code == EXIT_STALLED, status
    assert [s["reason"] for s in status["stalls"] if s["reason"] != "silent"] == ["seq-gap"], status["stalls"]
    line = _stall_line(human)
    assert "disk root: seq-gap: seq" in line and "never arrived" in line and "waited" in line, line

    # Ingest turns the gap into a resync request, says so (exit 3, an event) ...
    r = cli("ingest", "m1", env=env, check=False)
    assert r.returncode == EXIT_STALLED and "Traceback" not in r.stderr, r.stderr
    assert "m1/root: stalled (seq-gap):" in r.stderr and "asked the agent for a resync" in r.stderr, r.stderr
    events = _events("hotspare.machine.stalled", began)
    assert events and events[0].payload["reason"] == "seq-gap" and events[0].payload["disk"] == "root", events
    assert events[0].resource["hotspare.mode"] == "normal"
    # ... and until the agent resyncs, status says a resync is pending.
    code, status, human = _status(env)
    # (the flow's run may have outlasted the 10 s window since the agent's heartbeat: silent too)
    assert code == EXIT_STALLED and "resync-pending" in [s["reason"] for s in status["stalls"]], status
    assert "resync-pending: nothing after seq" in _stall_line(human)

    r = cli("agent", "m1", "--once", env=env)
    assert "(resync)" in r.stdout, r.stdout
    r = cli("ingest", "m1", env=env, check=False)
    assert r.returncode == 1 and "superseded by a resync" in r.stderr, r.stderr  # the orphan log is refused
    code, status, _ = _status(env)
    assert [s["reason"] for s in status["stalls"] if s["reason"] != "silent"] == [], status
    if not status["stalls"]:
        assert code == 0
    replica = tmp_path / "replica.raw"
    replay_catalog(st, load_catalog(st, "m1", "root", SIZE), replica)
    assert same_file(image, replica), "after the resync the replica is the disk: the lost log's write is back"


def test_shipped_but_not_ingested_and_silent_machines_are_stalled(tmp_path: Path, prefect_api: str) -> None:
    began = _now()
    root = tmp_path / "store"
    _, env = _protect(tmp_path, str(root), window=60)  # a loaded machine's steps outlast 10 s
    cli("agent", "m1", "--once", env=env)
    # Heartbeats arrive (it just sent one), but nothing is accepted: no ingest runs.
    st = open_store(str(root))
    (log,) = [o.key for o in st.list(layout.logs_prefix("m1", "root", 0))]
    assert _status(env)[0] == 0, "a log younger than the RPO is on its way"
    _age(root, log, 1000)  # the default RPO is 900 s
    code, status, human = _status(env)
    assert code == EXIT_STALLED and status["heartbeat"]["fresh"], status
    assert [s["reason"] for s in status["stalls"]] == ["not-ingested"], status["stalls"]
    line = _stall_line(human)
    assert "not-ingested: 1 shipped log(s) not accepted" in line and "RPO 900s" in line, line
    # The agent, alive, sees it too: in its log, its heartbeat and an event.
    r = cli("agent", "m1", "--once", env=env)
    assert "m1/root: stalled (not-ingested): 1 shipped log(s) not accepted" in r.stdout, r.stdout
    hb = json.loads(st.get(layout.heartbeat_key("m1")))
    assert [x["reason"] for x in hb["stalls"]] == ["not-ingested"], hb
    events = _events("hotspare.machine.stalled", began)
    assert events and events[0].payload["reason"] == "not-ingested" and events[0].payload["disk"] == "root", events

    # The agent stops: no heartbeat for longer than the window is a stall too (one line).
    _age(root, layout.heartbeat_key("m1"), 120)
    code, status, human = _status(env)
    assert code == EXIT_STALLED
    assert sorted(s["reason"] for s in status["stalls"]) == ["not-ingested", "silent"], status["stalls"]
    line = _stall_line(human)
    assert re.search(r"silent: no heartbeat for 1[2-4]\ds \(window 60s\)", line) and "not-ingested" in line, line


def test_the_agent_refuses_a_resized_disk_even_while_running(tmp_path: Path) -> None:
    image, env = _protect(tmp_path, str(tmp_path / "store"))
    cli("agent", "m1", "--once", env=env)
    proc = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "1", "--quiet"], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(2)
        with open(image, "r+b") as f:
            f.truncate(SIZE + (1 << 20))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert f"disk root of m1 ({image}) was {SIZE} bytes when protected and is now {SIZE + (1 << 20)}" in line, line
    assert f"re-protect it under a new name (hotspare protect m1-2 --disk root={image})" in line, line


def test_the_agent_waits_out_a_stopped_seaweedfs(tmp_path: Path, own_seaweedfs, prefect_api: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    began = _now()
    s3 = own_seaweedfs.info
    bucket = f"hotspare-test-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=bucket)
    aws = {"AWS_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key_id,
           "AWS_SECRET_ACCESS_KEY": s3.secret_access_key, "AWS_DEFAULT_REGION": s3.region}
    image, env = _protect(tmp_path, f"s3://{bucket}/root", window=10, PREFECT_API_URL=prefect_api, **aws)
    for k, v in aws.items():  # for this process's own store reads
        monkeypatch.setenv(k, v)
    out = open(tmp_path / "agent.log", "w+")  # noqa: SIM115 - the agent writes it; closed below
    agent = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "2", "--quiet"], env={**os.environ, **env},
                             stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        st = open_store(env["HOTSPARE_STORE"])
        _wait_heartbeat(st, lambda hb: hb is not None and hb.disks.get("root", {}).get("last_seq", -1) >= 0,
                             agent, out, 60)
        # SeaweedFS goes away for 3 windows; the disk is written meanwhile.
        own_seaweedfs.stop()
        stopped = time.monotonic()
        for i in range(5):
            qemu_io(image, f"write -P {0x61 + i} {(i * 3 + 1) << 19} 192k")
            time.sleep(5)
        while time.monotonic() - stopped < 30:
            time.sleep(0.5)
        assert agent.poll() is None, f"the agent exited {agent.returncode}:\n{_read(out)}"
        log = _read(out)
        assert "protection stalled: no heartbeat reached the store for" in log, log
        own_seaweedfs.start()
        first = _wait_heartbeat(st, lambda hb: hb is not None and hb.last_stall is not None, agent, out, 120)
        stall = first.last_stall
        assert stall["reason"] == "store-unreachable" and stall["seconds"] > 10, stall
        # One more cycle, started after every write: then the replica can be compared.
        _wait_heartbeat(st, lambda hb: hb is not None and hb.time > first.time, agent, out, 60)
        code, status, human = _status(env)
        assert code == 0 and status["heartbeat"]["last_stall"]["reason"] == "store-unreachable", status
        assert "m1: recovered from a stall (store-unreachable" in human, human
        assert "shipping resumed" in _read(out)
        events = _events("hotspare.machine.stalled", began)
        assert events and events[0].payload["reason"] == "store-unreachable", events
        assert _events("hotspare.machine.resumed", began)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0, _read(out)
        assert "Traceback" not in _read(out)
        cli("ingest", "m1", env=env)
        replica = tmp_path / "replica.raw"
        replay_catalog(st, load_catalog(st, "m1", "root", SIZE), replica)
        assert same_file(image, replica), "every write made while the store was away reached the replica"

        # Told to give up after 12 s, the agent exits 1 with one line once the store is away
        # that long, and not a minute later when the store's own retries run out.
        agent = subprocess.Popen([HOTSPARE, "agent", "m1", "--interval", "2", "--quiet", "--give-up-after", "12"],
                                 env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(4)
        own_seaweedfs.stop()
        stopped = time.monotonic()
        _, err = agent.communicate(timeout=90)
        assert agent.returncode == 1 and "Traceback" not in err, err
        (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert "m1: the store has not answered for" in line and "(--give-up-after 12s): giving up" in line, line
        assert time.monotonic() - stopped < 40, "it gave up when told to"
    finally:
        if agent.poll() is None:
            agent.kill()
        out.close()


def _now():
    from datetime import datetime, timezone

    return datetime.now(timezone.utc)


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _wait_heartbeat(st, ok, agent: subprocess.Popen, out, timeout: float):
    from hotspare.errors import StoreError
    from hotspare.heartbeat import load_heartbeat

    deadline = time.monotonic() + timeout
    while True:
        try:
            hb = load_heartbeat(st, "m1")
        except StoreError:
            hb = None
        if ok(hb):
            return hb
        if agent.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no such heartbeat (agent exit {agent.poll()}); last {hb}\n{_read(out)[-4000:]}")
        time.sleep(0.5)
