"""An NBD client on a unix socket, just enough to read a view's bytes and release them.

The capture reads a view through its NBD export (the same socket works for the machine's
daemon and for a VM's QEMU in a container, whose FUSE mounts stay in its own namespace), and
trims what it has read or will never read, so that the view's copy-before-write stops
copying those blocks. libnbd's Python binding is a Debian package for the system Python
only, so this speaks the protocol itself: fixed newstyle handshake, ``NBD_OPT_GO``, simple
replies, ``NBD_CMD_READ`` of at most :data:`MAX_READ` bytes (QEMU refuses reads above
32 MiB) and ``NBD_CMD_TRIM``.

Reference: https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md
"""

from __future__ import annotations

import os
import socket
import struct

from hotspare.errors import HotspareError
from hotspare.unixsocket import connect_unix

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
CMD_READ = 0
CMD_DISC = 2
CMD_TRIM = 4
FLAG_SEND_TRIM = 1 << 5  # transmission flag: the export accepts NBD_CMD_TRIM
MAX_READ = 32 << 20
MAX_TRIM = 1 << 30  # bytes per trim request (QEMU caps a discard near 2 GiB)
TRIM_BATCH = 256  # trims in flight: their replies (16 bytes each) never fill a socket buffer
READ_BATCH = 256  # reads in flight: their requests (28 bytes each) never fill a socket buffer


class NbdError(HotspareError):
    """The NBD server refused or broke the conversation."""


class NbdReader:
    """Reads an export at ``socket_path`` named ``export``; use as a context manager."""

    def __init__(self, socket_path: str | os.PathLike[str], export: str = "", *, timeout: float = 60.0,
                 max_read: int = MAX_READ) -> None:
        self.path = os.fspath(socket_path)
        self.export = export
        self.timeout = timeout
        self.max_read = min(max_read, MAX_READ)  # bytes per NBD read request at most
        self.size = 0
        self.can_trim = False
        self._sock: socket.socket | None = None
        self._handle = 0

    def __enter__(self) -> NbdReader:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _what(self) -> str:
        return f"NBD export {self.export!r} at {self.path}"

    def connect(self) -> None:
        try:
            sock = connect_unix(self.path, self.timeout)
        except OSError as err:
            raise NbdError(f"{self._what()}: cannot connect: {err.strerror or err}") from err
        self._sock = sock
        try:
            self._handshake()
        except BaseException:
            self.close()
            raise

    def _handshake(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not flags & FLAG_FIXED_NEWSTYLE:
            raise NbdError(f"{self._what()}: not a fixed-newstyle NBD server")
        self._send(struct.pack(">I", FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES)))
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._send(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        while True:
            magic, _opt, rtype, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if magic != REPLY_MAGIC:
                raise NbdError(f"{self._what()}: bad option reply")
            if rtype & 0x80000000:
                raise NbdError(f"{self._what()}: server refused the export "
                               f"({payload[4:].decode(errors='replace') if len(payload) > 4 else rtype})")
            if rtype == REP_INFO and len(payload) >= 12 and struct.unpack(">H", payload[:2])[0] == INFO_EXPORT:
                self.size, flags = struct.unpack(">QH", payload[2:12])
                self.can_trim = bool(flags & FLAG_SEND_TRIM)
            elif rtype == REP_ACK:
                return

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Fill ``buf`` with the export's bytes at ``offset``; returns len(buf)."""
        self.readv(buf, [(offset, len(buf))])
        return len(buf)

    def readv(self, buf: memoryview, ranges: list[tuple[int, int]]) -> None:
        """Read the (offset, length) ranges into ``buf`` one after another, as requests of
        at most ``max_read`` bytes, pipelined: one round trip for a batch of scattered
        blocks instead of one each."""
        if sum(n for _, n in ranges) > len(buf):
            raise ValueError("the reads do not fit the buffer")
        step = self.max_read
        ranges = [(off + at, min(step, n - at)) for off, n in ranges for at in range(0, n, step)]
        at = 0
        sent: dict[int, tuple[int, int, int]] = {}  # handle -> (offset, position in buf, length)
        for i in range(0, len(ranges), READ_BATCH):
            for off, n in ranges[i:i + READ_BATCH]:
                self._handle += 1
                sent[self._handle] = (off, at, n)
                at += n
                self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, self._handle, off, n))
            while sent:  # QEMU may answer out of order
                magic, error, handle = struct.unpack(">IIQ", self._recv(16))
                if magic != SIMPLE_REPLY_MAGIC or handle not in sent:
                    raise NbdError(f"{self._what()}: unexpected reply to a read")
                off, pos, n = sent.pop(handle)
                if error:
                    raise NbdError(f"{self._what()}: read of {n} bytes at {off} failed ({os.strerror(error)})")
                self._recv_into(buf[pos:pos + n])

    def discard(self, ranges: list[tuple[int, int]]) -> None:
        """Trim the (offset, length) ranges, pipelined; nothing when the export cannot trim
        (a trim only saves the server work here, it never changes what a read returns that
        the caller still wants)."""
        if not self.can_trim:
            return
        reqs = [(off + at, min(MAX_TRIM, n - at)) for off, n in ranges for at in range(0, n, MAX_TRIM)]
        for i in range(0, len(reqs), TRIM_BATCH):
            sent: dict[int, int] = {}
            for off, n in reqs[i:i + TRIM_BATCH]:
                self._handle += 1
                sent[self._handle] = off
                self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_TRIM, self._handle, off, n))
            for _ in range(len(sent)):  # QEMU may answer out of order
                magic, error, handle = struct.unpack(">IIQ", self._recv(16))
                if magic != SIMPLE_REPLY_MAGIC or handle not in sent:
                    raise NbdError(f"{self._what()}: unexpected reply to a trim")
                off = sent.pop(handle)
                if error:
                    raise NbdError(f"{self._what()}: trim at {off} failed ({os.strerror(error)})")

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
            except NbdError:
                pass
            self._sock.close()
            self._sock = None

    # -- transport -----------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as err:
            raise NbdError(f"{self._what()}: send failed: {err.strerror or err}") from err

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        assert self._sock is not None
        got = 0
        while got < len(view):
            try:
                k = self._sock.recv_into(view[got:])
            except OSError as err:
                raise NbdError(f"{self._what()}: receive failed: {err.strerror or err}") from err
            if k == 0:
                raise NbdError(f"{self._what()}: connection closed by the server")
            got += k
