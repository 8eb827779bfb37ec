"""The store on a local directory (the embedded default, and tests).

Each key is a file under the root (``a/b/c`` is ``ROOT/a/b/c``). Writes go to a temp file
in the destination's directory, are fsynced, and are then published with one atomic step:
``os.replace`` for an ordinary put, ``os.link`` for a create-only put (``link`` fails if the
name exists, which makes it a race-free create-only primitive on POSIX file systems). The
directory is fsynced after that so the new name survives a crash.

Terms:
- temp file: ``.tmp-<random>`` beside the destination; never listed, never a key. A key whose
  segment starts with ``.tmp-`` is refused here so the two can never be confused.
- uploaded bytes (of a compose): only bytes given as ``bytes`` segments count; copied ranges
  are copied file to file on this machine (``copy_file_range``, which can share extents on
  reflink file systems), so nothing crosses a network and they count as 0.

Limits: a key cannot be both an object and a "directory" of other keys (``a`` and ``a/b``),
as it can on S3; such a write fails with a :class:`StoreError`. Empty directories left by
:meth:`LocalStore.delete` are kept (removing them would race with a concurrent put into them).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone

from hotspare.errors import AlreadyExists, NotFound, StoreError, TransientStoreError, UsageError
from hotspare.store.base import (
    CopyRange,
    ObjectInfo,
    PartReceipt,
    Segment,
    Store,
    check_key,
    check_prefix,
    check_receipts,
    retrying,
)

TMP_PREFIX = ".tmp-"
# errnos a network file system (NFS, SMB, FUSE) returns for a fault that may pass: retried.
_TRANSIENT_ERRNOS = {errno.EAGAIN, errno.EINTR, errno.ETIMEDOUT, errno.ESTALE, errno.EBUSY}
_COPY_CHUNK = 64 << 20  # bytes per copy_file_range/sendfile/read call


class LocalStore(Store):
    """A store rooted at a local directory, created if missing."""

    def __init__(self, root: str) -> None:
        root = os.path.abspath(os.path.expanduser(root))
        try:
            os.makedirs(root, exist_ok=True)
        except OSError as err:
            raise UsageError(f"store directory {root}: cannot create it ({err.strerror})") from err
        if not os.path.isdir(root):
            raise UsageError(f"store directory {root}: not a directory")
        self.root = root
        self.url = "file://" + root

    def __repr__(self) -> str:
        return f"LocalStore({self.root!r})"

    # ----------------------------------------------------------------- helpers

    def _path(self, key: str) -> str:
        check_key(key)
        if any(part.startswith(TMP_PREFIX) for part in key.split("/")):
            raise StoreError(key, f"invalid key: segments starting with {TMP_PREFIX!r} are reserved")
        return os.path.join(self.root, *key.split("/"))

    def _name(self, key: str) -> str:
        """The key as shown in messages: the full path of its file."""
        return os.path.join(self.root, key)

    @contextlib.contextmanager
    def _errors(self, key: str, *, reading: bool) -> Iterator[None]:
        """Turn OS errors into store errors that name the object.

        ``reading``: a missing file (or a directory in its place) means the object does not
        exist; while writing the same errno means a broken layout and is a plain StoreError.
        """
        try:
            yield
        except OSError as err:
            name = self._name(key)
            if reading and err.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
                raise NotFound(name) from err
            if err.errno in _TRANSIENT_ERRNOS:
                raise TransientStoreError(name, err.strerror or str(err)) from err
            raise StoreError(name, err.strerror or str(err)) from err

    def _open_read(self, key: str) -> int:
        """An fd on the object's file; NotFound for a missing key (or a directory)."""
        path = self._path(key)
        with self._errors(key, reading=True):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotFound(self._name(key))
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _write(self, key: str, create_only: bool, fill: Callable[[int], None]) -> None:
        """Create a temp file beside ``key``, let ``fill(fd)`` write it, fsync, publish."""
        path = self._path(key)
        directory = os.path.dirname(path)
        with self._errors(key, reading=False):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = _create_temp(directory)
        try:
            try:
                fill(fd)
                with self._errors(key, reading=False):
                    os.fsync(fd)
            finally:
                os.close(fd)
            with self._errors(key, reading=False):
                self._publish(key, tmp, create_only)
        finally:
            # After os.replace the temp name is gone; after os.link it is a second name.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _publish(self, key: str, src: str, create_only: bool) -> None:
        """Make the fsynced file ``src``, on the store's file system, the object ``key``: a
        hard link (create-only: an existing object stays) or a rename over it."""
        target = self._path(key)
        if create_only:
            try:
                os.link(src, target)
            except FileExistsError as err:
                if os.path.isdir(target):  # not a rival writer: a layout clash
                    raise StoreError(self._name(key), "is a directory of other keys") from err
                raise AlreadyExists(self._name(key)) from err
        else:
            os.replace(src, target)
        _fsync_dir(os.path.dirname(target))

    # --------------------------------------------------------------- interface

    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        def fill(fd: int) -> None:
            with self._errors(key, reading=False):
                _write_all(fd, memoryview(data))

        if create_only:
            self._write(key, create_only, fill)  # a retry could not tell its own link from a rival's
        else:
            retrying(lambda: self._write(key, create_only, fill))

    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        try:
            src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"{path}: cannot read local file ({err.strerror})") from err
        try:
            size = os.fstat(src).st_size

            def fill(fd: int) -> None:
                with self._errors(key, reading=False):
                    if _copy(src, 0, fd, size) != size:
                        raise StoreError(path, "local file shrank while being stored")

            self._write(key, create_only, fill)
        finally:
            os.close(src)

    def put_staged(self, key: str, path: str, *, create_only: bool = False) -> None:
        """On the store's file system the file itself becomes the object (fsynced first, as
        :meth:`_write` does, then linked, or renamed), so an extent log is written to disk
        once, not twice; elsewhere it is copied."""
        directory = os.path.dirname(self._path(key))
        with self._errors(key, reading=False):
            os.makedirs(directory, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise UsageError(f"{path}: cannot read local file ({err.strerror})") from err
        try:
            with self._errors(key, reading=False):
                same_fs = os.fstat(fd).st_dev == os.stat(directory).st_dev
                if same_fs:
                    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make it unlike other objects
                    os.fsync(fd)
        finally:
            os.close(fd)
        if same_fs:
            with self._errors(key, reading=False):
                try:
                    self._publish(key, path, create_only)
                except OSError as err:
                    if err.errno not in _NO_LINK:
                        raise
                    same_fs = False  # a bind mount of the same device, or links refused
        if not same_fs:
            self.put_file(key, path, create_only=create_only)

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        return retrying(lambda: self._get_range(key, offset, length))

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        fd = self._open_read(key)
        try:
            with self._errors(key, reading=True):
                return _pread_all(fd, offset, length)
        finally:
            os.close(fd)

    def get(self, key: str) -> bytes:
        return retrying(lambda: self._get(key))

    def _get(self, key: str) -> bytes:
        fd = self._open_read(key)
        try:
            with self._errors(key, reading=True):
                return _pread_all(fd, 0, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def size(self, key: str) -> int:
        return self.stat(key).size

    def stat(self, key: str) -> ObjectInfo:
        return retrying(lambda: self._stat(key))

    def _stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        with self._errors(key, reading=True):
            st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise NotFound(self._name(key))
        return ObjectInfo(key, st.st_size, _mtime(st))

    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        # Start the walk at the deepest directory the prefix names completely.
        head, _, _ = prefix.rpartition("/")
        base = os.path.join(self.root, *head.split("/")) if head else self.root
        return self._walk(base, head + "/" if head else "", prefix, start_after or "")

    def _walk(self, directory: str, dir_key: str, prefix: str, after: str) -> Iterator[ObjectInfo]:
        """Keys under ``directory`` (whose keys start with ``dir_key``) in lexical order.

        Sorting a directory's entries by ``name`` for files and ``name + "/"`` for
        directories gives the same order as sorting the full keys, because a file name can
        never be a prefix of ``name/``; so a depth-first walk yields keys in S3's order.
        """
        try:
            with os.scandir(directory) as it:
                # Entries wholly at or before ``after`` are dropped before sorting: a listing
                # after the newest of 150,000 logs sorts only what follows it. (An entry
                # whose name ``after`` starts with may be a directory holding later keys.)
                entries = [
                    (key + ("/" if e.is_dir(follow_symlinks=False) else ""), e)
                    for e in it
                    if not e.name.startswith(TMP_PREFIX)
                    and ((key := dir_key + e.name) > after or after.startswith(key))
                ]
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as err:
            raise StoreError(directory, err.strerror or str(err)) from err
        entries.sort(key=lambda pair: pair[0])
        for key, entry in entries:
            if key.endswith("/"):
                # Descend only if the subtree can hold keys matching prefix and > after.
                if not (key.startswith(prefix) or prefix.startswith(key)):
                    continue
                if key < after and not after.startswith(key):
                    continue
                yield from self._walk(entry.path, key, prefix, after)
            elif key.startswith(prefix) and key > after and entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # deleted since the scan
                yield ObjectInfo(key, st.st_size, _mtime(st))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with self._errors(key, reading=False):
            try:
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return
            _fsync_dir(os.path.dirname(path))

    def compose(self, key: str, segments: Sequence[Segment], *, create_only: bool = False) -> int:
        """See :meth:`Store.compose`. Returns the bytes of ``bytes`` segments only: copied
        ranges are local file-to-file copies and move nothing over a network."""
        # Open and check every source before writing anything, so a bad range fails early.
        fds: dict[str, int] = {}
        try:
            for seg in segments:
                if isinstance(seg, CopyRange):
                    _check_range(seg.offset, seg.length)
                    if seg.key not in fds:
                        fds[seg.key] = self._open_read(seg.key)
                    size = os.fstat(fds[seg.key]).st_size
                    if seg.offset + seg.length > size:
                        raise StoreError(
                            self._name(seg.key),
                            f"copy range {seg.offset}+{seg.length} ends past the object's "
                            f"end ({size} bytes)",
                        )
            uploaded = 0

            def fill(fd: int) -> None:
                nonlocal uploaded
                for seg in segments:
                    if isinstance(seg, CopyRange):
                        with self._errors(seg.key, reading=True):
                            if _copy(fds[seg.key], seg.offset, fd, seg.length) != seg.length:
                                raise StoreError(self._name(seg.key), "object shrank during compose")
                    else:
                        with self._errors(key, reading=False):
                            _write_all(fd, memoryview(seg))
                        uploaded += len(seg)

            self._write(key, create_only, fill)
            return uploaded
        finally:
            for fd in fds.values():
                os.close(fd)


    # Staged compose: the token is the temp file beside the key; parts are written at their
    # offsets, and finishing publishes the file like any other write.
    def begin_compose(self, key: str) -> str:
        directory = os.path.dirname(self._path(key))
        with self._errors(key, reading=False):
            os.makedirs(directory, exist_ok=True)
            fd, tmp = _create_temp(directory)
            os.close(fd)
        return tmp

    def _token(self, key: str, token: str) -> str:
        if os.path.dirname(token) != os.path.dirname(self._path(key)) or not os.path.basename(token).startswith(TMP_PREFIX):
            raise StoreError(self._name(key), f"not a compose token of this key: {token}")
        return token

    def compose_part(self, key: str, token: str, number: int, offset: int, segments: Sequence[Segment]) -> PartReceipt:
        tmp = self._token(key, token)
        size = uploaded = 0
        with self._errors(key, reading=False):
            fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.lseek(fd, offset, os.SEEK_SET)
            for seg in segments:
                if isinstance(seg, CopyRange):
                    src = self._open_read(seg.key)
                    try:
                        with self._errors(seg.key, reading=True):
                            if _copy(src, seg.offset, fd, seg.length) != seg.length:
                                raise StoreError(self._name(seg.key), f"copy range {seg.offset}+{seg.length} ends past the object's end")
                    finally:
                        os.close(src)
                    size += seg.length
                else:
                    with self._errors(key, reading=False):
                        _write_all(fd, memoryview(seg))
                    size += len(seg)
                    uploaded += len(seg)
        finally:
            os.close(fd)
        return PartReceipt(number=number, offset=offset, size=size, etag="", uploaded=uploaded)

    def finish_compose(self, key: str, token: str, receipts: Sequence[PartReceipt], *, create_only: bool = False) -> None:
        tmp = self._token(key, token)
        parts = check_receipts(self._name(key), receipts)
        total = parts[-1].offset + parts[-1].size if parts else 0
        path = self._path(key)
        try:
            with self._errors(key, reading=False):
                fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.ftruncate(fd, total)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                if create_only:
                    try:
                        os.link(tmp, path)
                    except FileExistsError as err:
                        raise AlreadyExists(self._name(key)) from err
                else:
                    os.replace(tmp, path)
                _fsync_dir(os.path.dirname(path))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def abort_compose(self, key: str, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._token(key, token))


# ------------------------------------------------------------------ file helpers


def _mtime(st: os.stat_result) -> datetime:
    """When the file was last written, by this machine's clock (the store's clock here)."""
    return datetime.fromtimestamp(st.st_mtime, timezone.utc)


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"invalid byte range: offset={offset} length={length}")


def _create_temp(directory: str) -> tuple[int, str]:
    """A new temp file in ``directory``. Unlike mkstemp's 0600 it gets the umask's usual
    mode, so objects are as readable as any file the user creates."""
    while True:
        path = os.path.join(directory, TMP_PREFIX + secrets.token_hex(8))
        try:
            return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


def _umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, view: memoryview) -> None:
    view = view.cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    """Up to ``length`` bytes from ``offset``; fewer only at end of file."""
    first = os.pread(fd, length, offset)
    if len(first) == length or not first:
        return first
    # A single pread may be short (Linux caps one read near 2 GiB): gather the rest.
    parts = [first]
    got = len(first)
    while got < length:
        more = os.pread(fd, min(length - got, _COPY_CHUNK), offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


# errnos with which link says "not here": the file is copied instead.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP, errno.ENOTSUP}
# errnos with which copy_file_range/sendfile say "not here", so the next method is tried.
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM}


def _copy(src: int, offset: int, dst: int, length: int) -> int:
    """Copy ``length`` bytes of ``src`` from ``offset`` to ``dst``'s current position, in the
    kernel where possible; returns the bytes copied (fewer only if ``src`` ended)."""

    def by_copy_file_range(at: int, n: int) -> int:
        # May share extents (reflink) or copy inside the kernel.
        return os.copy_file_range(src, dst, n, at)

    def by_sendfile(at: int, n: int) -> int:
        return os.sendfile(dst, src, at, n)

    def by_read(at: int, n: int) -> int:
        data = os.pread(src, n, at)
        _write_all(dst, memoryview(data))
        return len(data)

    methods = [by_sendfile, by_read]
    if hasattr(os, "copy_file_range"):
        methods.insert(0, by_copy_file_range)
    done = 0
    for method in methods:
        try:
            while done < length:
                got = method(offset + done, min(length - done, _COPY_CHUNK))
                if got == 0:
                    return done
                done += got
            return done
        except OSError as err:
            if method is by_read or err.errno not in _UNSUPPORTED:
                raise
    return done
