"""Serving a recovery point read-only over NBD: nbdkit with hotspare's plugin
(:mod:`.nbdkit_plugin`) on a unix socket. qemu-img, qemu-io and QEMU read it as
``nbd+unix:///?socket=PATH``; a failed-over VM's disk is a qcow2 overlay over it.

Store credentials reach nbdkit through its environment, never its command line (which any
user can read in ``ps``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sysconfig
import time
from pathlib import Path

from hotspare.errors import HotspareError

PLUGIN = Path(__file__).with_name("nbdkit_plugin.py")
REPO = Path(__file__).resolve().parents[2]


def nbd_uri(socket: str | os.PathLike[str]) -> str:
    return f"nbd+unix:///?socket={os.path.abspath(socket)}"


def server_command(store_url: str, root_key: str, socket: Path, *, pidfile: Path | None = None,
                   errlog: Path | None = None, cache_mib: int = 512) -> list[str]:
    """nbdkit's command line: in the foreground (it ends with its parent: nbdkit asks the
    kernel for that itself), or with ``pidfile`` daemonised, outliving whoever started it;
    the plugin appends its read errors to ``errlog``."""
    nbdkit = shutil.which("nbdkit")
    if nbdkit is None:
        raise HotspareError("serving a point needs nbdkit with its Python plugin: apt-get install nbdkit "
                            "nbdkit-plugin-python (scripts/setup.sh installs them)")
    mode = ["--pidfile", str(pidfile), "--log=stderr"] if pidfile is not None else ["--foreground"]
    return [nbdkit, "--unix", str(socket), "--readonly", *mode, "python", str(PLUGIN),
            f"sitedir={sysconfig.get_paths()['purelib']}", f"path={REPO}", f"store={store_url}", f"root={root_key}",
            f"cache_mib={cache_mib}", *([f"errlog={errlog}"] if errlog is not None else [])]


def start_server(store_url: str, root_key: str, socket: Path, *, log: Path, env: dict[str, str] | None = None,
                 timeout: float = 30.0) -> subprocess.Popen:
    """Start nbdkit serving the point whose index root is ``root_key`` at ``socket`` as a
    child that ends with this process (``hotspare serve``); returns when the socket is there."""
    socket = _fresh_socket(socket)
    with open(log, "ab") as out:
        proc = subprocess.Popen(server_command(store_url, root_key, socket), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=_child_env(env), start_new_session=True)
    deadline = time.monotonic() + timeout
    while not socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(proc.pid)
            raise HotspareError(f"nbdkit serving {root_key} at {socket} did not start: {_tail(log)}")
        time.sleep(0.05)
    return proc


def start_detached_server(store_url: str, root_key: str, socket: Path, pidfile: Path, *, log: Path,
                          env: dict[str, str] | None = None, timeout: float = 30.0) -> int:
    """Start nbdkit as a daemon serving ``root_key`` at ``socket``: it outlives the caller
    (a failed-over VM reads it after the flow that started it has ended, or was killed).
    Returns its pid, also written to ``pidfile``, once the socket is there."""
    socket = _fresh_socket(socket)
    pidfile.unlink(missing_ok=True)
    with open(log, "ab") as out:
        # nbdkit forks after its plugin opened the point: a bad store or root fails here.
        proc = subprocess.run(server_command(store_url, root_key, socket, pidfile=pidfile, errlog=log), stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_child_env(env),
                              timeout=timeout, start_new_session=True)  # not in the caller's process group,
        # which a killed or cancelled flow run loses whole (seen: a killed failover took its server along)
    if proc.returncode != 0:
        raise HotspareError(f"nbdkit serving {root_key} at {socket} did not start: {_tail(log)}")
    deadline = time.monotonic() + timeout
    while (pid := read_pid(pidfile)) is None or not socket.exists():
        if time.monotonic() > deadline:
            raise HotspareError(f"nbdkit serving {root_key} at {socket} wrote no pid file: {_tail(log)}")
        time.sleep(0.02)
    return pid


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _fresh_socket(socket: Path) -> Path:
    socket = Path(os.path.abspath(socket))
    socket.parent.mkdir(parents=True, exist_ok=True)
    socket.unlink(missing_ok=True)
    return socket


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    # nbdkit embeds the system's Python, which finds its standard library from the first
    # python3 on PATH: a virtualenv's there would mix two Pythons' C modules (ssl fails).
    child = {k: v for k, v in {**os.environ, **(env or {})}.items()
             if k not in ("VIRTUAL_ENV", "PYTHONHOME", "PYTHONPATH")}
    child["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"
    return child


def _tail(log: Path) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:]) or "no output"


def server_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except (ProcessLookupError, FileNotFoundError, PermissionError):
        return False


def stop_server(pid: int, timeout: float = 10.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while server_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if server_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        # Return only once it is gone: a caller that checks next must not still see it.
        deadline = time.monotonic() + 5.0
        while server_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
