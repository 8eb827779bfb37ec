"""A fault-injecting HTTP proxy on loopback, in front of a real S3 server (SeaweedFS).

Requests pass through unchanged (their signatures stay valid: the Host header is kept);
a rule can answer a matching request with a fault instead: ``truncate`` sends the server's
status and headers, then half the body, then closes the connection; ``503`` answers
SlowDown and ``500`` InternalError without asking the server; ``reset`` closes the
connection before the server saw the request, ``reset-after`` once the server acted on it
(its answer is lost); ``stall`` holds the request for ``STALL`` seconds, then forwards it.
"""

from __future__ import annotations

import http.client
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

STALL = 3.0  # seconds a ``stall`` holds a request


@dataclass
class Rule:
    method: str  # GET, HEAD, PUT, ...
    path_contains: str
    fault: str  # truncate, 503, 500, reset, reset-after, stall
    times: int  # how many matching requests get the fault
    hits: int = 0


@dataclass
class FaultProxy:
    upstream: str
    rules: list[Rule] = field(default_factory=list)
    faults: int = 0  # faults injected so far

    def __post_init__(self) -> None:
        up = urlsplit(self.upstream)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                headers = dict(self.headers.items())
                if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                    body = self._read_chunked()
                    headers = {k: v for k, v in headers.items() if k.lower() != "transfer-encoding"}
                    headers["Content-Length"] = str(len(body))
                else:
                    length = int(self.headers.get("Content-Length") or 0)
                    body = self.rfile.read(length) if length else None
                rule = proxy._match(self.command, self.path)
                if rule is not None and rule.fault == "reset":
                    self.close_connection = True
                    self.connection.close()
                    return
                if rule is not None and rule.fault in ("503", "500"):
                    code = "SlowDown" if rule.fault == "503" else "InternalError"
                    msg = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(rule.fault))
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if rule is not None and rule.fault == "stall":
                    time.sleep(STALL)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                finally:
                    conn.close()
                if rule is not None and rule.fault == "reset-after":
                    self.close_connection = True
                    self.connection.close()
                    return
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD's length is the object's, not of its (empty) body.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                if rule is not None and rule.fault == "truncate" and self.command != "HEAD" and len(data) > 1:
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _read_chunked(self) -> bytes:
                out = bytearray()
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return bytes(out)
                    out += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that gave up on a faulted connection is expected

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            for r in self.rules:
                if r.method == method and r.path_contains in path and r.hits < r.times:
                    r.hits += 1
                    self.faults += 1
                    return r
        return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
