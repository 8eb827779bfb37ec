"""The store check on both stores: a store that protection, the agent and consolidation made
checks clean; damage done through the store interface (a flipped byte in a chunk, a deleted
page, a truncated pack, a corrupt catalog version, a quarantined log still named accepted) is
each found, all at once, naming the object; garbage is repairable; without --read-data a
check of a disk of several GiB reads only metadata."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from hotspare import layout
from hotspare.catalog import catalog_logs, load_catalog
from hotspare.replica.index import IndexRoot, pack_id, read_page, read_root
from hotspare.replica.packs import TOC, TRAILER, read_toc
from hotspare.store import Store, open_store
from tests.helpers import cli, qemu_io
from tests.servers import CountingStore
from tests.test_consolidate import SIZE, protect, random_writes

pytestmark = pytest.mark.usefixtures("prefect_api")


def build(tmp_path: Path, store_url: str) -> dict[str, str]:
    """m1 protected, two points (the second after random writes by qemu-io)."""
    image, env = protect(tmp_path, store_url)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    random_writes(image, seed=5)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    return env


def check(env: dict[str, str], *args: str) -> tuple[int, dict, str]:
    """``hotspare check m1 ARGS --json`` and the plain run: exit code, report, plain output."""
    r = cli("check", "m1", *args, "--json", env=env, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    report = json.loads(r.stdout)
    plain = cli("check", "m1", *args, env=env, check=False)
    assert plain.returncode == r.returncode and "Traceback" not in plain.stderr, plain.stdout + plain.stderr
    assert plain.stdout.strip().splitlines()[-1] == report["summary"]
    return r.returncode, report, plain.stdout


def lines_naming(out: str, key: str) -> list[str]:
    return [ln for ln in out.splitlines() if key in ln]


def disk(store: Store) -> tuple:
    cat = load_catalog(store, "m1", "root", SIZE)
    roots = {p.id: read_root(store, p.root) for p in cat.points}
    return cat, roots


def a_chunk(store: Store, root: IndexRoot, skip: set[str] = frozenset()) -> tuple[str, int, int]:
    """(pack key, offset, length) of a stored chunk of ``root`` in a pack not in ``skip``."""
    for n in sorted(root.pages):
        ents = read_page(store, root, n)
        for e in ents[ents["length"] > 0]:
            key = root.packs[pack_id(int(e["pack"]))].key
            if key not in skip:
                return key, int(e["offset"]), int(e["length"])
    raise AssertionError("no chunk found")


def users_of(store: Store, roots: dict[str, IndexRoot], key: str, offset: int) -> tuple[list[str], list[int]]:
    pts, blocks = set(), set()
    for pid, root in roots.items():
        ids = [int(i, 16) for i, ref in root.packs.items() if ref.key == key]
        for n in root.pages:
            ents = read_page(store, root, n)
            hit = np.flatnonzero((ents["length"] > 0) & np.isin(ents["pack"], ids) & (ents["offset"] == offset))
            if len(hit):
                pts.add(pid)
                blocks.update((n * root.page_chunks + hit).tolist())
    return sorted(pts), sorted(blocks)


def flip_byte(store: Store, key: str, at: int) -> None:
    data = bytearray(store.get(key))
    data[at] ^= 0x5A
    store.put(key, bytes(data))


def findings(report: dict, key: str) -> list[dict]:
    return [f for f in report["findings"] if f["key"] == key]


def test_clean_store_checks_clean_and_read_data_names_a_flipped_chunk(tmp_path: Path, store_url: str, store) -> None:
    env = build(tmp_path, store_url)
    code, report, out = check(env)
    assert (code, report["verdict"], report["findings"]) == (0, "clean", []), out
    assert report["packs"] > 0 and report["packs_read"] == 0 and report["logs"] > 0
    code, report, out = check(env, "--read-data")
    assert (code, report["findings"]) == (0, []), out
    assert report["packs_read"] == report["packs"] and report["chunks_verified"] > 0
    assert report["logs_read"] == report["logs"]

    cat, roots = disk(store)
    key, offset, length = a_chunk(store, roots[cat.points[0].id])
    flip_byte(store, key, offset + length // 2)
    code, report, out = check(env)
    assert (code, report["findings"]) == (0, []), "a check without --read-data reads no chunk"
    code, report, out = check(env, "--read-data")
    assert code == 2, out
    [bad] = findings(report, key)
    pts, blocks = users_of(store, roots, key, offset)
    assert (bad["severity"], bad["offset"], bad["points"], bad["blocks"]) == ("damaged", offset, pts, blocks)
    assert f"chunk at byte {offset}" in bad["reason"] and "SHA-256" in bad["reason"]
    [line] = lines_naming(out, key)
    assert "damaged" in line and f"chunk at byte {offset}" in line and all(p in line for p in pts)
    assert len(report["findings"]) == 1, report["findings"]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, prefect_api: str) -> Path:
    """A local store with two points, copied by each test that damages it."""
    root = tmp_path_factory.mktemp("built")
    build(root, str(root / "store"))
    return root / "store"


@pytest.fixture
def copy(built: Path, tmp_path: Path) -> Iterator[tuple[Store, dict[str, str]]]:
    shutil.copytree(built, tmp_path / "store")
    st = open_store(str(tmp_path / "store"))
    yield st, {"HOTSPARE_STORE": st.url}
    st.close()


def delete_page(store: Store) -> str:
    cat, roots = disk(store)
    root = roots[cat.points[-1].id]
    key = root.pages[sorted(root.pages)[0]].key
    store.delete(key)
    return key


def truncate_pack(store: Store, skip: set[str] = frozenset()) -> str:
    cat, roots = disk(store)
    key = next(ref.key for ref in roots[cat.points[-1].id].packs.values() if ref.key not in skip)
    store.put(key, store.get(key)[:-100])
    return key


def corrupt_catalog(store: Store) -> str:
    key = layout.catalog_key("m1", "root", 1)
    store.put(key, b'{"format_version": 3, "machine": "m1", "disk": "root", "version": 1, "disk_si')
    return key


def quarantine_accepted(store: Store) -> tuple[str, str]:
    from hotspare.quarantine import quarantine

    cat = load_catalog(store, "m1", "root", SIZE)
    key = catalog_logs(store, cat)[-1].key
    return key, quarantine(store, key, "damaged on purpose by the test")


DAMAGES = {
    "deleted page": (lambda st: delete_page(st), "missing: index page"),
    "truncated pack": (lambda st: truncate_pack(st), "(pack of point(s)"),
    "corrupt catalog": (lambda st: corrupt_catalog(st), "version 1 does not parse or chain"),
    "quarantined accepted log": (lambda st: quarantine_accepted(st)[1], "quarantined, yet catalog v"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_each_damage_is_found_in_one_line_naming_the_object(copy, damage: str) -> None:
    store, env = copy
    do, reason = DAMAGES[damage]
    key = do(store)
    code, report, out = check(env)
    assert code == 2, out
    [f] = [f for f in findings(report, key) if reason in f["reason"]]
    assert f["severity"] == "damaged"
    assert any(reason in ln and "damaged" in ln for ln in lines_naming(out, key)), out


def test_an_entry_that_disagrees_with_its_pack_is_found_without_reading_data(copy) -> None:
    """An index page rewritten (with its SHA-256 in the root) so that one entry points at
    the wrong offset and another has a wrong length: found from the tables of contents."""
    from hotspare.check import check_store
    from hotspare.replica.index import page_bytes, page_ref, root_bytes

    store, env = copy
    cat, roots = disk(store)
    point = cat.points[-1]
    root = roots[point.id]
    n = sorted(root.pages)[0]
    ents = read_page(store, root, n).copy()
    stored = np.flatnonzero(ents["length"] > 0)
    moved, shortened = int(stored[0]), int(stored[1])
    ents[moved]["offset"] += 512
    ents[shortened]["length"] -= 512
    key = root.pages[n].key
    body = page_bytes(n, ents)
    store.put(key, body)
    root.pages[n] = page_ref(key, body)
    store.put(point.root, root_bytes(root))
    report = check_store(store, "m1")
    bad = {f.reason.split(": block(s) ", 1)[1]: f for f in report.findings if f.key == key}
    first = n * root.page_chunks
    toc = {b for why, f in bad.items() if "disagree with the table of contents" in why for b in f.blocks}
    lengths = [f for why, f in bad.items() if "lengths differ" in why]
    assert {first + moved, first + shortened} <= toc, report.findings
    assert lengths and lengths[0].blocks == [first + shortened], report.findings
    assert report.exit_code == 2 and report.packs_read == 0


def test_garbage_is_repairable_and_consolidate_repairs_it(copy) -> None:
    store, env = copy
    cat, roots = disk(store)
    old = next(iter(roots.values())).packs
    src = next(iter(old.values())).key
    stray = layout.pack_key("m1", "root", cat.version, 0x1234)
    store.put(stray, store.get(src), create_only=True)
    newer = layout.pack_key("m1", "root", cat.version + 1, 0x4321)  # a build about to commit: not garbage
    store.put(newer, store.get(src), create_only=True)
    code, report, out = check(env)
    assert code == 1, out
    [f] = report["findings"]
    assert (f["key"], f["severity"]) == (stray, "repairable") and "garbage" in f["reason"]
    assert "hotspare consolidate m1" in f["repair"]
    cli("consolidate", "m1", env=env)
    code, report, out = check(env)
    assert (code, report["findings"]) == (0, []), out


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the S3 side is covered by the tests above
def test_several_damages_at_once_are_all_reported(tmp_path: Path, store_url: str, store) -> None:
    env = build(tmp_path, store_url)
    cat, roots = disk(store)
    flipped, offset, length = a_chunk(store, roots[cat.points[-1].id])
    flip_byte(store, flipped, offset)
    page = delete_page(store)
    pack = truncate_pack(store, skip={flipped})
    catalog = corrupt_catalog(store)
    log, qkey = quarantine_accepted(store)
    code, report, out = check(env, "--read-data")
    assert code == 2, out
    for key, why in ((flipped, f"chunk at byte {offset}"), (page, "missing: index page"),
                     (pack, "truncated"), (catalog, "does not parse"), (qkey, "quarantined, yet"),
                     (log, "missing: accepted log")):
        assert [f for f in findings(report, key) if why in f["reason"] and f["severity"] == "damaged"], (key, out)
        assert lines_naming(out, key), (key, out)


def test_cli_faults_are_one_line_with_exit_3(copy) -> None:
    store, env = copy
    for args, says in ((("nope",), "not protected"), (("m1", "--read-data=2"), "--read-data=2"),
                       (("m1", "--bogus"), "unexpected argument")):
        r = cli("check", *args, env=env, check=False)
        assert r.returncode in (2, 3) and says in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
        assert r.returncode == 3 or "--bogus" in args


def test_the_flow_publishes_the_findings_and_fails_when_damaged(copy) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.check import check as check_flow

    store, env = copy
    report = check_flow(machine="m1", store=store.url)
    assert report.verdict == "clean"
    key = delete_page(store)
    state = check_flow(machine="m1", store=store.url, return_state=True)
    assert state.is_failed() and "damaged" in state.message
    with get_client(sync_client=True) as client:
        [art] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["check-m1"])),
                                      limit=1, sort="CREATED_DESC")
    assert key in json.dumps(art.data)


@pytest.mark.parametrize("store_url", ["local"], indirect=True)  # the S3 side is covered by the tests above
def test_a_check_of_a_disk_of_several_gib_reads_only_metadata(tmp_path: Path, store_url: str) -> None:
    from hotspare.check import check_store

    size = 4 << 30
    image = tmp_path / "disk.img"
    rng = np.random.default_rng(9)
    with open(image, "wb") as f:  # random bytes: neither deduplicated nor compressed away
        f.truncate(size)
        for off, n in ((0, 4 << 20), (1 << 30, 1 << 20), (3 << 30, 300 << 10)):
            f.seek(off)
            f.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    env = {"HOTSPARE_STORE": store_url, "HOTSPARE_AGENT_STATE": str(tmp_path / "agent"), "HOTSPARE_TRACKER": "scan"}
    cli("protect", "m1", "--disk", f"root={image}", env=env)
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)
    qemu_io(image, "write -P 4 2G 64K", "write -P 5 100M 8K")
    cli("agent", "m1", "--once", env=env)
    cli("consolidate", "m1", env=env)

    st = CountingStore(open_store(store_url), record_reads=True)
    report = check_store(st, "m1")
    assert report.verdict == "clean", [f.line() for f in report.findings]
    packs = {o.key: o.size for o in st.list(layout.packs_prefix("m1", "root"))}
    logs = {o.key: o.size for o in st.list(layout.disk_prefix("m1", "root") + "epochs/")}
    stored = sum(packs.values()) + sum(logs.values())
    assert stored > 5 << 20
    data_end = {k: size - TRAILER - len(read_toc(st.inner, k)) * TOC.itemsize for k, size in packs.items()}
    for key, offset, n in st.reads:
        if key in packs:  # only the table of contents and the trailer
            assert offset >= data_end[key], f"read {n} bytes of {key}'s chunks at {offset}"
    assert st.read_bytes() < 1 << 20, f"read {st.read_bytes()} bytes of metadata, {stored} bytes stored"
    assert st.read_bytes(layout.packs_prefix("m1", "root")) < 64 << 10

    st.reads.clear()
    report = check_store(st, "m1", read_data=1.0)
    assert report.verdict == "clean" and report.packs_read == len(packs)
    assert st.read_bytes() >= stored - (1 << 20), "with --read-data every pack and log is read"
