"""The store contract, run on both backends (a local directory and SeaweedFS over S3).

Plus: part planning for S3 compose (pure), error translation, ``open_store`` URLs and the
Prefect store block.
"""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from hotspare.errors import AlreadyExists, NotFound, StoreError, TransientStoreError, UsageError
from hotspare.store import CopyRange, LocalStore, ObjectInfo, Store, open_store

MiB = 1 << 20


def rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def is_s3(store: Store) -> bool:
    return store.url.startswith("s3://")


# ------------------------------------------------------------------ put / get


def test_put_get_size(store: Store) -> None:
    store.put("a/b/c.json", b'{"x": 1}')
    assert store.get("a/b/c.json") == b'{"x": 1}'
    assert store.size("a/b/c.json") == 8
    assert store.exists("a/b/c.json") and not store.exists("a/b/nope")
    data = rand(3 * MiB + 17, 1)
    store.put("big", memoryview(data))
    assert store.get("big") == data
    store.put("empty", b"")
    assert store.get("empty") == b"" and store.size("empty") == 0


def test_create_only_loser_gets_already_exists(store: Store) -> None:
    store.put("state/1.json", b"first", create_only=True)
    with pytest.raises(AlreadyExists) as exc:
        store.put("state/1.json", b"second", create_only=True)
    assert "state/1.json" in str(exc.value)
    assert store.get("state/1.json") == b"first"


def test_create_only_race_has_one_winner(store: Store) -> None:
    contenders = 8
    barrier = threading.Barrier(contenders)

    def attempt(i: int) -> bool:
        barrier.wait()
        try:
            store.put("catalog/00000000000000000001.json", b"writer %d" % i, create_only=True)
            return True
        except AlreadyExists:
            return False

    with ThreadPoolExecutor(contenders) as pool:
        won = list(pool.map(attempt, range(contenders)))
    assert won.count(True) == 1
    assert store.get("catalog/00000000000000000001.json") == b"writer %d" % won.index(True)


def test_overwrite_is_atomic(store: Store) -> None:
    """A reader during overwrites sees one whole version, never a mix or a missing key."""
    versions = [bytes([v]) * (2 * MiB) for v in range(4)]
    store.put("current", versions[0])
    stop = threading.Event()
    seen: set[bytes] = set()

    def read() -> None:
        while not stop.is_set():
            got = store.get("current")
            assert got in versions, "reader saw a torn object"
            seen.add(got[:1])

    reader = ThreadPoolExecutor(1)
    future = reader.submit(read)
    try:
        for i in range(1, 16):
            store.put("current", versions[i % 4])
    finally:
        stop.set()
        future.result()
        reader.shutdown()
    assert store.get("current") == versions[15 % 4]
    assert [o.key for o in store.list("")] == ["current"]  # no temp files show


def test_put_file_small_and_multipart(store: Store, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.write_bytes(rand(100_000, 2))
    store.put_file("f/small", str(small))
    assert store.get("f/small") == small.read_bytes()

    # Above 64 MiB the S3 backend switches to its own multipart upload.
    big = tmp_path / "big"
    big.write_bytes(rand(70 * MiB + 5, 3))
    store.put_file("f/big", str(big), create_only=True)
    assert store.size("f/big") == big.stat().st_size
    assert store.get_range("f/big", 70 * MiB - 3, 100) == big.read_bytes()[70 * MiB - 3 :]
    # Create-only on the multipart path: CompleteMultipartUpload with If-None-Match.
    with pytest.raises(AlreadyExists):
        store.put_file("f/big", str(small), create_only=True)
    with pytest.raises(AlreadyExists):
        store.put_file("f/small", str(small), create_only=True)
    assert store.size("f/big") == big.stat().st_size
    with pytest.raises(UsageError, match="nope"):
        store.put_file("f/x", str(tmp_path / "nope"))


def test_put_staged_takes_a_given_up_file_where_it_can_and_copies_elsewhere(store: Store, tmp_path: Path) -> None:
    """Extent logs are staged and given up: a local store on the same file system links
    the file instead of writing it a second time; across file systems, and on S3, the
    bytes are uploaded. Either way create-only holds and the object stays whole after the
    caller removes its file."""
    staged = tmp_path / "staged"
    staged.write_bytes(rand(300_000, 4))
    staged.chmod(0o600)  # as mkstemp makes it
    data = staged.read_bytes()
    store.put_staged("g/log", str(staged), create_only=True)
    if isinstance(store, LocalStore):
        obj = Path(store.root) / "g" / "log"
        assert obj.stat().st_ino == staged.stat().st_ino  # linked, not copied
        umask = os.umask(0)
        os.umask(umask)
        assert obj.stat().st_mode & 0o777 == 0o666 & ~umask  # as readable as the store's other objects
    with pytest.raises(AlreadyExists):
        store.put_staged("g/log", str(tmp_path / "staged"), create_only=True)
    staged.unlink()
    assert store.get("g/log") == data
    staged.write_bytes(b"newer")
    store.put_staged("g/log", str(staged))  # not create-only: over the object
    staged.unlink(missing_ok=True)  # the store may have taken the name
    assert store.get("g/log") == b"newer"
    other = Path("/dev/shm") / f"hs-staged-{os.getpid()}"  # tmpfs: another file system
    try:
        other.write_bytes(b"x" * 4096)
        store.put_staged("g/shm", str(other))
        other.write_bytes(b"y" * 4096)  # a copy: later writes to the file do not reach it
        assert store.get("g/shm") == b"x" * 4096
    finally:
        other.unlink(missing_ok=True)
    with pytest.raises(UsageError, match="nope"):
        store.put_staged("g/x", str(tmp_path / "nope"))


# -------------------------------------------------------------------- reading


def test_get_range(store: Store) -> None:
    data = rand(1000, 4)
    store.put("r", data)
    assert store.get_range("r", 0, 10) == data[:10]
    assert store.get_range("r", 990, 10) == data[990:]
    assert store.get_range("r", 995, 10) == data[995:]  # crosses the end: short
    assert store.get_range("r", 1000, 10) == b""  # starts at the end
    assert store.get_range("r", 5000, 10) == b""  # past the end
    assert store.get_range("r", 10, 0) == b""
    store.put("e", b"")
    assert store.get_range("e", 0, 10) == b""


def test_missing_objects(store: Store) -> None:
    for call in (
        lambda: store.get("no/such"),
        lambda: store.size("no/such"),
        lambda: store.get_range("no/such", 0, 10),
        lambda: store.get_range("no/such", 0, 0),
        lambda: store.open("no/such"),
    ):
        with pytest.raises(NotFound) as exc:
            call()
        assert "no/such" in str(exc.value)
    assert not store.exists("no/such")
    store.put("no/other", b"x")
    with pytest.raises(NotFound):
        store.get("no")  # a "directory" of keys is not an object


def test_open_is_seekable_and_ranged(store: Store, tmp_path: Path) -> None:
    data = rand(3 * MiB + 123, 5)
    store.put("log.parquet", data)
    with store.open("log.parquet", buffer_size=64 * 1024) as f:
        assert f.seekable()
        f.seek(-8, io.SEEK_END)
        assert f.read(8) == data[-8:]
        f.seek(MiB)
        assert f.read(100) == data[MiB : MiB + 100]
        assert f.tell() == MiB + 100
        f.seek(10, io.SEEK_CUR)
        assert f.read(5) == data[MiB + 110 : MiB + 115]
        f.seek(0)
        assert f.read() == data
        assert f.read(1) == b""
    out = tmp_path / "downloaded"
    assert store.download("log.parquet", str(out), chunk=MiB) == len(data)
    assert out.read_bytes() == data


# -------------------------------------------------------------------- listing


def test_list_prefix_start_after_and_pages(store: Store) -> None:
    keys = sorted(
        [f"m/a/logs/{i:020d}.parquet" for i in range(25)]
        + ["m/a/catalog/00000000000000000001.json", "m/a/machine.json", "m/b/machine.json", "n/x"]
    )
    for k in keys:
        store.put(k, k.encode())
    if is_s3(store):
        store.list_page_size = 4  # type: ignore[attr-defined]  # many pages, small test
    infos = list(store.list(""))
    assert infos == [ObjectInfo(k, len(k)) for k in keys]
    assert [o.key for o in store.list("m/a/logs/")] == [k for k in keys if k.startswith("m/a/logs/")]
    # A prefix need not end at a "/".
    assert [o.key for o in store.list("m/a/ma")] == ["m/a/machine.json"]
    assert [o.key for o in store.list("m/")] == [k for k in keys if k.startswith("m/")]
    assert list(store.list("zzz/")) == []
    # start_after resumes after a key, in the middle of a page and across directories.
    logs = [k for k in keys if k.startswith("m/a/logs/")]
    assert [o.key for o in store.list("m/a/logs/", start_after=logs[9])] == logs[10:]
    assert [o.key for o in store.list("", start_after="m/a/logs/")] == [k for k in keys if k > "m/a/logs/"]
    assert [o.key for o in store.list("m/", start_after="m/a/machine.json")] == ["m/b/machine.json"]
    assert list(store.list("m/a/logs/", start_after=logs[-1])) == []
    # Lazy: taking the first item does not need the rest.
    assert next(iter(store.list(""))).key == keys[0]


def test_delete(store: Store) -> None:
    store.put("d/1", b"1")
    store.put("d/2", b"2")
    store.delete("d/1")
    assert not store.exists("d/1")
    store.delete("d/1")  # missing is fine
    store.delete("never/was")
    assert [o.key for o in store.list("d/")] == ["d/2"]


@pytest.mark.parametrize("prefix", ["/", "/a", "../", "a/../", "a//", "a\\b"])
def test_invalid_prefixes_rejected(store: Store, prefix: str) -> None:
    with pytest.raises(StoreError, match="invalid prefix"):
        store.list(prefix)


@pytest.mark.parametrize(
    "key", ["", "/a", "a/", "a//b", "a/./b", "a/../b", "..", "a\\b"]
)
def test_invalid_keys_rejected(store: Store, key: str) -> None:
    for call in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.size(key),
        lambda: store.delete(key),
        lambda: store.compose(key, [b"x"]),
        lambda: store.compose("ok", [CopyRange(key, 0, 1)]),
    ):
        with pytest.raises(StoreError, match="invalid key"):
            call()


# -------------------------------------------------------------------- compose


def expected_bytes(sources: dict[str, bytes], segments: list) -> bytes:
    return b"".join(
        sources[s.key][s.offset : s.offset + s.length] if isinstance(s, CopyRange) else bytes(s)
        for s in segments
    )


def test_compose_mixed_segments(store: Store) -> None:
    sources = {"vhd/base": rand(24 * MiB + 3, 6), "logs/one": rand(3 * MiB, 7)}
    for k, v in sources.items():
        store.put(k, v)
    new = [rand(n, 100 + n) for n in (4096, 100_000, 7, 2 * MiB + 1, 512)]
    segments = [
        CopyRange("vhd/base", 0, 6 * MiB),  # large: copied on the server
        new[0],  # small new bytes ...
        CopyRange("logs/one", 100, MiB),  # ... and a small copy: downloaded, one buffered part
        CopyRange("vhd/base", 6 * MiB + 7, 12 * MiB),  # large: its head tops that part up to 5 MiB
        new[1],
        CopyRange("logs/one", 0, 10),
        CopyRange("logs/one", 10, 20),  # adjacent to the previous: merged into one GET
        new[2],
        CopyRange("vhd/base", MiB + 1, 7 * MiB),  # large, but after a short part: downloaded whole
        CopyRange("vhd/base", 15 * MiB, 9 * MiB + 3),  # large after a full part
        memoryview(new[3]),
        CopyRange("vhd/base", 0, 0),  # empty: ignored
        b"",
        CopyRange("vhd/base", 0, 24 * MiB + 3),  # the bulk of the object: copied
        CopyRange("vhd/base", 3, 24 * MiB),
        new[4],  # the last part may be short
    ]
    want = expected_bytes(sources, segments)
    uploaded = store.compose("vhd/next", segments)
    assert store.size("vhd/next") == len(want)
    assert store.get("vhd/next") == want
    new_bytes = sum(len(n) for n in new)
    if is_s3(store):
        # New bytes plus the few copied ranges needed to fill parts to 5 MiB.
        assert new_bytes <= uploaded < len(want) // 4
    else:
        assert uploaded == new_bytes  # local copies move no bytes over a network

    # Compose over an existing key replaces it; a source may be the target itself.
    again = [CopyRange("vhd/next", 0, 6 * MiB), b"tail"]
    want2 = expected_bytes({"vhd/next": want}, again)
    store.compose("vhd/next", again)
    assert store.get("vhd/next") == want2


def test_compose_edge_cases(store: Store) -> None:
    store.put("src", rand(MiB, 8))
    assert store.compose("empty", []) == 0
    assert store.get("empty") == b""
    store.compose("small", [CopyRange("src", 5, 100)])
    assert store.get("small") == store.get("src")[5:105]
    store.compose("one-copy", [CopyRange("src", 0, MiB)])
    assert store.get("one-copy") == store.get("src")

    with pytest.raises(AlreadyExists):
        store.compose("small", [b"other"], create_only=True)
    assert store.get("small") == store.get("src")[5:105]
    big = rand(6 * MiB, 9)
    store.put("big", big)
    with pytest.raises(AlreadyExists):  # the multipart path
        store.compose("small", [CopyRange("big", 0, 6 * MiB), b"x" * 10], create_only=True)
    assert store.get("small") == store.get("src")[5:105]
    assert store.compose("fresh", [CopyRange("big", 0, 6 * MiB), b"x"], create_only=True) >= 1

    # Bad sources fail before anything is written, and leave nothing behind.
    with pytest.raises(NotFound, match="missing"):
        store.compose("out", [b"x" * MiB, CopyRange("missing", 0, 1)])
    with pytest.raises(StoreError, match="past the object's end"):
        store.compose("out", [CopyRange("big", 6 * MiB - 10, 11)])
    assert not store.exists("out")
    assert "out" not in {o.key for o in store.list("")}


def test_compose_failure_leaves_no_object(store: Store) -> None:
    """A source deleted while the compose runs: the upload fails and nothing appears."""
    store.put("a", rand(6 * MiB, 10))
    store.put("b", rand(100, 11))
    segments = [CopyRange("a", 0, 6 * MiB), b"x", CopyRange("b", 0, 100)]
    real_get_range = store.get_range

    def get_range_after_delete(key: str, offset: int, length: int) -> bytes:
        store.delete("b")
        return real_get_range(key, offset, length)

    store.get_range = get_range_after_delete  # type: ignore[method-assign]
    if is_s3(store):
        with pytest.raises(NotFound):
            store.compose("out", segments)
        assert not store.exists("out")
        # ... and the multipart upload was aborted, not left to hold its parts.
        uploads = store._client.list_multipart_uploads(Bucket=store.bucket)  # type: ignore[attr-defined]
        assert uploads.get("Uploads", []) == []
    else:
        # The local store holds its sources open, so it completes from what it opened.
        store.compose("out", segments)
        assert store.size("out") == 6 * MiB + 101


# --------------------------------------------------------- backend specifics


def _length(segments: list) -> int:
    return sum(s.length if isinstance(s, CopyRange) else len(s) for s in segments)


def test_s3_compose_part_plan() -> None:
    """Every part but the last is 5 MiB..5 GiB, at most 10,000, bytes in order."""
    from hotspare.store.s3 import MAX_PART, MAX_PARTS, MIN_PART, _coalesce, _CopyPart, _plan_parts

    def check(segments: list) -> list:
        items = _coalesce(segments)
        parts = _plan_parts(items)
        assert len(parts) <= MAX_PARTS
        for p in parts[:-1]:
            size = p.source.length if isinstance(p, _CopyPart) else p.size
            assert MIN_PART <= size <= MAX_PART
        # The parts hold the segments' bytes, in order.
        flat = []
        for p in parts:
            flat.extend([p.source] if isinstance(p, _CopyPart) else p.pieces)
        assert _length(flat) == _length(items)
        assert b"".join(bytes(s) for s in flat if not isinstance(s, CopyRange)) == b"".join(
            bytes(s) for s in items if not isinstance(s, CopyRange)
        )
        return parts

    # 12 GiB copy: split into 3 copy parts, none above 5 GiB.
    parts = check([CopyRange("k", 0, 12 << 30)])
    assert len(parts) == 3 and all(isinstance(p, _CopyPart) for p in parts)
    # Tiny writes between large copies, 30,000 of them: too many parts at first, so the
    # planner downloads more, and stays within 10,000 parts.
    segs: list = []
    for i in range(15_000):
        segs += [CopyRange("vhd", i * 8 * MiB, 6 * MiB), b"w" * 512]
    check(segs)
    # A short data part takes the head of the next large copy to reach 5 MiB ...
    parts = check([b"x" * MiB, CopyRange("k", 0, 20 * MiB)])
    assert [type(p).__name__ for p in parts] == ["_DataPart", "_CopyPart"]
    assert parts[0].size == MIN_PART and parts[1].source == CopyRange("k", 4 * MiB, 16 * MiB)
    # ... and the whole copy when less than 5 MiB of it would be left.
    parts = check([b"x", CopyRange("k", 0, 7 * MiB), CopyRange("k", 10 * MiB, 20 * MiB)])
    assert not isinstance(parts[0], _CopyPart) and parts[0].size == 7 * MiB + 1


def test_s3_error_translation() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

    from hotspare.store.s3 import translate

    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {"Error": {"Code": code, "Message": f"msg {code}"}, "ResponseMetadata": {"HTTPStatusCode": status}},
            "Op",
        )

    name = "s3://b/p/k"
    assert type(translate(client_error("NoSuchKey", 404), name)) is NotFound
    assert type(translate(client_error("404", 404), name)) is NotFound
    assert type(translate(client_error("PreconditionFailed", 412), name, create_only=True)) is AlreadyExists
    assert type(translate(client_error("ConditionalRequestConflict", 409), name, create_only=True)) is AlreadyExists
    assert type(translate(client_error("PreconditionFailed", 412), name)) is StoreError
    for code, status in [("SlowDown", 503), ("InternalError", 500), ("Whatever", 502), ("RequestTimeout", 400)]:
        assert type(translate(client_error(code, status), name)) is TransientStoreError
    err = translate(client_error("AccessDenied", 403), name)
    assert type(err) is StoreError and str(err) == "s3://b/p/k: AccessDenied: msg AccessDenied"
    assert type(translate(client_error("NoSuchBucket", 404), name)) is StoreError
    assert type(translate(EndpointConnectionError(endpoint_url="http://x"), name)) is TransientStoreError
    assert type(translate(ReadTimeoutError(endpoint_url="http://x"), name)) is TransientStoreError


def test_s3_errors_from_the_server(s3_env) -> None:
    from botocore.exceptions import ClientError

    from hotspare.store import S3Store

    store = S3Store("no-such-bucket-here", "p")
    with pytest.raises(StoreError, match=r"s3://no-such-bucket-here/p/k: NoSuchBucket") as exc:
        store.get("k")
    assert type(exc.value) is StoreError and isinstance(exc.value.__cause__, ClientError)
    bad = S3Store("whatever", "", secret_access_key="wrong", access_key_id=s3_env.access_key_id)
    with pytest.raises(StoreError) as exc:
        bad.put("k", b"x")
    assert not isinstance(exc.value, NotFound | TransientStoreError)
    assert "s3://whatever/k" in str(exc.value)


def test_s3_create_only_is_enforced_at_completion(s3_env) -> None:
    """A create-only multipart write loses a race decided after its early existence check:
    ``CompleteMultipartUpload`` with ``If-None-Match: *`` refuses it (SeaweedFS: 412)."""
    from hotspare.store import S3Store

    s3_env.client().create_bucket(Bucket="race-at-completion")
    store = S3Store("race-at-completion", "p")
    store.put("big", rand(6 * MiB, 12))
    store.put("small", b"0123456789")
    real_get_range = store.get_range

    def get_range_while_another_writer_wins(key: str, offset: int, length: int) -> bytes:
        if not store.exists("target"):
            store.put("target", b"winner", create_only=True)
        return real_get_range(key, offset, length)

    store.get_range = get_range_while_another_writer_wins  # type: ignore[method-assign]
    with pytest.raises(AlreadyExists, match="s3://race-at-completion/p/target") as exc:
        store.compose("target", [CopyRange("big", 0, 6 * MiB), CopyRange("small", 0, 10)], create_only=True)
    assert exc.value.__cause__.operation_name == "CompleteMultipartUpload"  # type: ignore[union-attr]
    assert store.get("target") == b"winner"
    assert store._client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []


def test_local_list_order_is_s3_lexical_order(tmp_path: Path) -> None:
    """Keys sort as strings, as on AWS S3: ``d-z`` < ``d/x`` < ``d0`` (``-`` < ``/`` < ``0``).

    (SeaweedFS 4.48 lists in directory-tree order instead: ``d/x`` before ``d-z``. The
    hotspare layout does not depend on the difference: it lists within one directory.)
    """
    store = LocalStore(str(tmp_path))
    keys = ["c/x", "d-z", "d.a", "d/q/r", "d/x", "d/y", "d0", "e"]
    for k in reversed(keys):
        store.put(k, b"1")
    assert [o.key for o in store.list("")] == keys
    assert [o.key for o in store.list("d")] == keys[1:7]
    assert [o.key for o in store.list("", start_after="d-z")] == keys[2:]
    assert [o.key for o in store.list("", start_after="d/q")] == keys[3:]
    assert [o.key for o in store.list("d/", start_after="d/q/r")] == ["d/x", "d/y"]


def test_local_temp_files_and_conflicts(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path / "s"))
    store.put("a/b", b"1")
    (tmp_path / "s" / "a" / ".tmp-leftover").write_bytes(b"crash debris")
    assert [o.key for o in store.list("")] == ["a/b"]
    with pytest.raises(StoreError, match="reserved"):
        store.put("a/.tmp-x", b"1")
    with pytest.raises(StoreError):  # "a/b" is an object, so it cannot hold "a/b/c"
        store.put("a/b/c", b"1")
    for create_only in (False, True):
        with pytest.raises(StoreError) as exc:  # "a" holds keys, so it cannot be one
            store.put("a", b"1", create_only=create_only)
        assert type(exc.value) is StoreError
    assert oct((tmp_path / "s" / "a" / "b").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert store.url == "file://" + str(tmp_path / "s")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ open_store


def test_open_store_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HOTSPARE_STORE", raising=False)
    default = open_store()
    assert isinstance(default, LocalStore) and default.root == str(tmp_path / ".hotspare" / "store")
    assert (tmp_path / ".hotspare" / "store").is_dir()

    monkeypatch.setenv("HOTSPARE_STORE", str(tmp_path / "from-env"))
    assert open_store().url == "file://" + str(tmp_path / "from-env")

    assert open_store("rel/dir").root == str(tmp_path / "rel" / "dir")  # type: ignore[attr-defined]
    assert open_store(f"file://{tmp_path}/u").root == str(tmp_path / "u")  # type: ignore[attr-defined]
    assert open_store(f"file://localhost{tmp_path}/v").root == str(tmp_path / "v")  # type: ignore[attr-defined]

    for bad, words in [
        ("ftp://x", "ftp://x"),
        ("s3://ab/prefix", "bucket name 'ab'"),
        ("s3://", "bucket name ''"),
        ("file://relative/path", "file:///absolute/path"),
        ("", "empty"),
    ]:
        with pytest.raises(UsageError, match=re.escape(words)):
            open_store(bad)

    s3 = open_store("s3://my-bucket/some/prefix/", endpoint_url="http://127.0.0.1:1")
    assert s3.url == "s3://my-bucket/some/prefix"
    assert open_store("s3://my-bucket").url == "s3://my-bucket"


def test_importing_the_store_loads_neither_boto3_nor_prefect() -> None:
    code = "import sys, hotspare.store; print(sorted(m for m in ('boto3', 'prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ the block


def test_store_block_hides_its_secret(s3_env, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from blocks.store import HotspareStore

    secret = s3_env.secret_access_key
    block = HotspareStore(
        url="s3://block-test-bucket/p",
        endpoint_url=s3_env.endpoint_url,
        access_key_id=s3_env.access_key_id,
        secret_access_key=secret,
    )
    for text in (
        repr(block),
        str(block),
        repr(block.model_dump()),
        json.dumps(block.model_dump(mode="json")),
        block.model_dump_json(),
    ):
        assert secret not in text
    assert "*****" in json.dumps(block.model_dump(mode="json"))
    assert HotspareStore.get_block_type_slug() == "hotspare-store"
    for name, field in HotspareStore.model_fields.items():
        assert field.title and field.description, name

    # open() reveals the secret to the store only: it signs real requests with it.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    s3_env.client().create_bucket(Bucket="block-test-bucket")
    store = block.open()
    store.put("k", b"v")
    assert store.get("k") == b"v"
    assert secret not in repr(store)


# --------------------------------------------------------------- staged compose


def test_staged_compose_parts_in_any_order(store: Store) -> None:
    src = os.urandom(12 << 20)
    store.put("src/a", src)
    new_head = os.urandom(6 << 20)
    token = store.begin_compose("dst/x")
    parts = [
        (1, 0, [new_head]),
        (2, len(new_head), [CopyRange("src/a", 0, 6 << 20)]),
        (3, len(new_head) + (6 << 20), [b"tail", CopyRange("src/a", 100, 1000)]),
    ]
    receipts = [store.compose_part("dst/x", token, n, off, segs) for n, off, segs in reversed(parts)]
    assert not store.exists("dst/x"), "nothing is visible before finish"
    store.finish_compose("dst/x", token, receipts, create_only=True)
    assert store.get("dst/x") == new_head + src[: 6 << 20] + b"tail" + src[100:1100]
    assert sum(r.uploaded for r in receipts) < len(new_head) + (6 << 20)
    # create-only: a second staged compose of the same key is refused, the object kept.
    token = store.begin_compose("dst/x")
    r = store.compose_part("dst/x", token, 1, 0, [b"other"])
    with pytest.raises(AlreadyExists):
        store.finish_compose("dst/x", token, [r], create_only=True)
    assert store.get("dst/x")[:10] == new_head[:10]


def test_staged_compose_refuses_gaps_and_abort_leaves_nothing(store: Store) -> None:
    token = store.begin_compose("dst/y")
    r1 = store.compose_part("dst/y", token, 1, 0, [b"a" * (5 << 20)])
    r3 = store.compose_part("dst/y", token, 3, 99 << 20, [b"c"])
    with pytest.raises(StoreError, match="do not tile"):
        store.finish_compose("dst/y", token, [r1, r3])
    token = store.begin_compose("dst/z")
    store.compose_part("dst/z", token, 1, 0, [b"a"])
    store.abort_compose("dst/z", token)
    assert not store.exists("dst/z")
    assert [o.key for o in store.list("dst/")] == []
