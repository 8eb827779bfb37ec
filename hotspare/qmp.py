"""A small QMP (QEMU Machine Protocol) client: a unix socket carrying JSON, one message a line.

The storage daemon (:mod:`hotspare.capture.daemon`) and the QEMU VM hosts
(:mod:`hotspare.vm.qemu`) both speak it. The exchange: QEMU greets (``{"QMP": {...}}``),
the client sends ``qmp_capabilities``, then each ``{"execute": cmd, "arguments": {...},
"id": n}`` gets ``{"return": ...}`` or
``{"error": {"class": ..., "desc": ...}}`` with the same id; asynchronous events
(``{"event": ...}``) may come in between and are kept in :attr:`QmpClient.events`.

QEMU's QMP server serves one client at a time and queues the others, so callers open a
client for a few commands and close it: a connection held open would stall every other
status query or capture step for that VM.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

from hotspare.errors import HotspareError
from hotspare.unixsocket import connect_unix

DEFAULT_TIMEOUT = 10.0


class QmpError(HotspareError):
    """A QMP command failed or QEMU did not answer. ``error_class`` is QEMU's error class
    (``CommandNotFound``, ``GenericError``, ...) or ``None`` for a transport fault."""

    def __init__(self, socket_path: str, command: str, desc: str, error_class: str | None = None) -> None:
        self.socket_path = socket_path
        self.command = command
        self.error_class = error_class
        self.desc = desc
        what = f"{error_class}: {desc}" if error_class else desc
        super().__init__(f"QMP {command} on {socket_path}: {what}")


class QmpClient:
    """One QMP connection. Use as a context manager: ``with QmpClient(path) as q: q.execute(...)``."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting: dict[str, Any] = {}
        self._sock: socket.socket | None = None
        self._buf = b""
        self._next_id = 0

    # -- connection ----------------------------------------------------------------------
    def connect(self) -> QmpClient:
        try:
            self._sock = connect_unix(self.path, self.timeout)
        except OSError as err:
            raise QmpError(self.path, "connect", f"cannot connect: {err.strerror or err}") from err
        try:
            # QEMU greets only once it accepts us, which waits while another client is served.
            greeting = self._read("greeting", time.monotonic() + self.timeout)
            if "QMP" not in greeting:
                raise QmpError(self.path, "greeting", f"not a QMP greeting: {str(greeting)[:200]}")
            self.greeting = greeting["QMP"]
            self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> QmpClient:
        return self.connect() if self._sock is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- commands ------------------------------------------------------------------------
    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float | None = None, **args: Any) -> Any:
        """Run ``command`` with ``arguments`` (for names with hyphens) and ``args``; returns
        QEMU's ``return`` value, or raises :class:`QmpError` naming the command and QEMU's
        error class and description."""
        if self._sock is None:
            raise QmpError(self.path, command, "not connected")
        merged = {**(arguments or {}), **args}
        self._next_id += 1
        msg_id = f"hotspare-{self._next_id}"
        msg: dict[str, Any] = {"execute": command, "id": msg_id}
        if merged:
            msg["arguments"] = merged
        try:
            self._sock.sendall(json.dumps(msg).encode() + b"\n")
        except OSError as err:
            raise QmpError(self.path, command, f"send failed: {err.strerror or err}") from err
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read(command, deadline)
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != msg_id:
                continue  # an answer to a command another client sent before us: not ours
            if "error" in reply:
                err = reply["error"]
                raise QmpError(self.path, command, str(err.get("desc", err)), str(err.get("class", "Error")))
            return reply.get("return")

    def _read(self, command: str, deadline: float) -> dict[str, Any]:
        assert self._sock is not None
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QmpError(self.path, command, "no answer in time (QEMU busy, or another QMP client connected)")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as err:
                raise QmpError(self.path, command, f"receive failed: {err.strerror or err}") from err
            if not chunk:
                raise QmpError(self.path, command, "connection closed by QEMU")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            msg = json.loads(line)
        except ValueError as err:
            raise QmpError(self.path, command, f"unparsable message {line[:200]!r}") from err
        if not isinstance(msg, dict):
            raise QmpError(self.path, command, f"unexpected message {line[:200]!r}")
        return msg


def qmp_execute(path: str | os.PathLike[str], command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = DEFAULT_TIMEOUT, **args: Any) -> Any:
    """Connect, run one command, disconnect."""
    with QmpClient(path, timeout=timeout) as q:
        return q.execute(command, arguments, **args)


class QmpSession:
    """A QMP connection opened on first use and kept: :meth:`execute` drops it on a
    transport fault (an error with no QEMU error class: a closed socket, a timeout, a
    restarted QEMU), so the next command connects again, and keeps it on QEMU's own errors.
    Subclasses say how to open it (:meth:`_open_qmp`)."""

    _qmp: QmpClient | None = None

    def _open_qmp(self) -> QmpClient:
        raise NotImplementedError

    def qmp(self) -> QmpClient:
        if self._qmp is None:
            self._qmp = self._open_qmp()
        return self._qmp

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None

    def execute(self, command: str, arguments: dict[str, Any] | None = None, **args: Any) -> Any:
        try:
            return self.qmp().execute(command, arguments, **args)
        except QmpError as err:
            if err.error_class is None:
                self.close()
            raise
