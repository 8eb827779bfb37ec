"""The store interface: one small set of operations, two backends (local directory, S3).

Terms:
- key: a ``/``-separated object name under the store's root, never starting with ``/``
  and never containing ``.`` or ``..`` segments.
- create-only put: succeeds only if the key does not exist (S3 ``If-None-Match: *``,
  local ``link``); the loser of a race gets :class:`~hotspare.errors.AlreadyExists`.
- compose: build a new object from byte ranges of existing objects plus new bytes,
  without moving the copied bytes through this process where the backend can avoid it
  (S3 multipart upload with ``UploadPartCopy``).
"""

from __future__ import annotations

import io
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import BinaryIO, TypeVar

from hotspare.errors import StoreError, TransientStoreError


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    # When the store received the object (S3 LastModified, a local file's mtime): the store's
    # clock, not the writer's, so it decides ages (heartbeat freshness). None if unknown.
    # Not part of equality: two listings of the same objects are equal.
    modified: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CopyRange:
    """``length`` bytes of object ``key`` starting at ``offset``, copied into a compose."""

    key: str
    offset: int
    length: int


# A compose is a sequence of segments, written one after the other.
Segment = CopyRange | bytes | memoryview


@dataclass(frozen=True)
class PartReceipt:
    """One part of a staged compose, as :meth:`Store.compose_part` wrote it."""

    number: int  # 1-based, in object order
    offset: int  # where the part starts in the new object
    size: int
    etag: str  # the backend's receipt for the part
    uploaded: int  # bytes that went through this process for this part


def check_receipts(key: str, receipts: Sequence[PartReceipt]) -> list[PartReceipt]:
    """Receipts in order, checked to tile the new object with no gap or overlap."""
    ordered = sorted(receipts, key=lambda r: r.number)
    at = 0
    for i, r in enumerate(ordered, 1):
        if r.number != i or r.offset != at:
            raise StoreError(key, f"compose parts do not tile the object: part {r.number} at {r.offset}, expected part {i} at {at}")
        at += r.size
    return ordered


# Transient store errors (throttling, 5xx, resets, truncated bodies) are retried here, in
# one place, by both backends: capped exponential backoff with jitter, about 15 s in all
# before the error is raised. Only idempotent calls are retried (reads, plain puts, deletes,
# parts of a staged compose); a create-only put is retried by S3Store.put, which then tells
# its own earlier write from a rival's.
RETRY_ATTEMPTS = 7
RETRY_FIRST_DELAY = 0.2
RETRY_MAX_DELAY = 5.0

T = TypeVar("T")


# Who hears of transient faults while a call is still being retried: a long-running agent
# says it waits for the store before the call gives up (which, with botocore's own retries
# underneath, takes about a minute). Listeners are called in the thread of the failing call;
# one that raises abandons the call with its error (an agent told to give up).
_fault_listeners: list[Callable[[TransientStoreError], None]] = []


def add_fault_listener(listener: Callable[[TransientStoreError], None]) -> None:
    _fault_listeners.append(listener)


def remove_fault_listener(listener: Callable[[TransientStoreError], None]) -> None:
    if listener in _fault_listeners:
        _fault_listeners.remove(listener)


def tell_fault(err: TransientStoreError) -> None:
    for listener in list(_fault_listeners):
        listener(err)


def retry_delays(attempts: int = RETRY_ATTEMPTS) -> Iterator[float]:
    """The pauses between ``attempts`` tries: doubling from RETRY_FIRST_DELAY, capped."""
    delay = RETRY_FIRST_DELAY
    for _ in range(attempts - 1):
        yield min(delay, RETRY_MAX_DELAY) * random.uniform(0.5, 1.0)
        delay *= 2


def retrying(call: Callable[[], T], *, attempts: int = RETRY_ATTEMPTS) -> T:
    """``call()``, tried again after a :class:`TransientStoreError`; the last one is raised."""
    for delay in retry_delays(attempts):
        try:
            return call()
        except TransientStoreError as err:
            tell_fault(err)
            time.sleep(delay)
    try:
        return call()
    except TransientStoreError as err:
        tell_fault(err)
        raise


def check_key(key: str) -> str:
    if (
        not key
        or key.startswith("/")
        or key.endswith("/")
        or "\\" in key
        or any(part in ("", ".", "..") for part in key.split("/"))
    ):
        raise StoreError(key or "<empty key>", "invalid key")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: ``""``, or a key's leading part (``a/b/``, ``a/b/par``) whose
    complete segments are valid key segments."""
    head, _, _ = prefix.rpartition("/")
    if prefix.startswith("/") or "\\" in prefix or (head and _bad_segments(head)):
        raise StoreError(prefix, "invalid prefix")
    return prefix


def _bad_segments(path: str) -> bool:
    return any(part in ("", ".", "..") for part in path.split("/"))


class Store(ABC):
    """An object store rooted at :attr:`url`."""

    url: str

    @abstractmethod
    def put(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        """Write a whole object atomically (readers see the old or the new, never a mix)."""

    @abstractmethod
    def put_file(self, key: str, path: str, *, create_only: bool = False) -> None:
        """Upload a local file as one object, streaming; atomic like :meth:`put`."""

    def put_staged(self, key: str, path: str, *, create_only: bool = False) -> None:
        """:meth:`put_file` for a local file the caller gives up: it never writes the file
        again and removes its name afterwards if it is still there, so a store may take the
        file itself."""
        self.put_file(key, path, create_only=create_only)

    @abstractmethod
    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (fewer only at the object's end)."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """The whole object. Use for small objects (catalogs, JSON) only."""

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes; raises NotFound."""

    def stat(self, key: str) -> ObjectInfo:
        """The object's size and, where the backend knows it, when the store received it;
        raises NotFound."""
        return ObjectInfo(key, self.size(key))

    @abstractmethod
    def list(self, prefix: str, *, start_after: str | None = None) -> Iterator[ObjectInfo]:
        """Objects whose key starts with ``prefix``, in lexical key order, paginated lazily."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object; removing a missing one is not an error."""

    @abstractmethod
    def compose(self, key: str, segments: Sequence[Segment], *, create_only: bool = False) -> int:
        """Write ``key`` as the concatenation of ``segments``; returns the bytes uploaded
        (new bytes plus any copied bytes the backend had to move through this process)."""

    # A staged compose writes the parts of one new object from several workers: begin, then
    # compose_part for each part (any order, in parallel), then finish or abort. Every part
    # but the last must be at least 5 MiB (S3's rule). Tokens are plain strings so that a
    # task on another worker can be handed one.
    @abstractmethod
    def begin_compose(self, key: str) -> str:
        """Start a staged compose of ``key``; returns its token."""

    @abstractmethod
    def compose_part(self, key: str, token: str, number: int, offset: int, segments: Sequence[Segment]) -> PartReceipt:
        """Write part ``number``, which starts at byte ``offset`` of the new object."""

    @abstractmethod
    def finish_compose(self, key: str, token: str, receipts: Sequence[PartReceipt], *, create_only: bool = False) -> None:
        """Publish the new object atomically from its parts."""

    @abstractmethod
    def abort_compose(self, key: str, token: str) -> None:
        """Drop a staged compose; nothing becomes visible."""

    def download(self, key: str, path: str, *, chunk: int = 64 << 20) -> int:
        """Stream an object into a local file; returns its size."""
        total = self.size(key)
        with open(path, "wb") as out:
            offset = 0
            while offset < total:
                data = self.get_range(key, offset, min(chunk, total - offset))
                if not data:
                    raise StoreError(key, f"object ended at {offset} bytes, expected {total}")
                out.write(data)
                offset += len(data)
        return total

    def exists(self, key: str) -> bool:
        from hotspare.errors import NotFound

        try:
            self.size(key)
        except NotFound:
            return False
        return True

    def open(self, key: str, *, buffer_size: int = 8 << 20) -> BinaryIO:
        """A seekable, read-only file over the object; reads become ranged gets, so
        reading a Parquet footer never downloads the whole object."""
        return io.BufferedReader(_RangeReader(self, key), buffer_size=buffer_size)  # type: ignore[arg-type]

    def process_env(self) -> dict[str, str]:
        """Environment variables another process needs to open this store by its URL."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class _RangeReader(io.RawIOBase):
    def __init__(self, store: Store, key: str) -> None:
        self._store = store
        self._key = key
        self._size = store.size(key)
        self._pos = 0

    @property
    def name(self) -> str:
        return self._key

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buf) -> int:  # type: ignore[override]
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        data = self._store.get_range(self._key, self._pos, n)
        if len(data) != n:
            raise StoreError(self._key, f"short read at {self._pos}: got {len(data)} of {n} bytes")
        buf[:n] = data
        self._pos += n
        return n
