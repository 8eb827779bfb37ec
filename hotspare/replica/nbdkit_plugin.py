"""nbdkit's Python plugin serving one recovery point read-only: nbdkit (a maintained NBD
server) speaks the protocol, this file only answers reads from the point's chunks.

Run by :mod:`hotspare.replica.serve` as
``nbdkit --unix SOCK python nbdkit_plugin.py sitedir=... store=URL root=KEY``; nbdkit's
embedded interpreter is the system's, so ``sitedir`` adds hotspare's virtualenv to its path.
"""

from __future__ import annotations

import builtins
import site
import sys

try:
    import nbdkit  # type: ignore[import-not-found]  # provided by nbdkit's embedded interpreter
except ImportError:  # imported outside nbdkit (a scan of the package): nothing to serve
    nbdkit = None

API_VERSION = 2
_args: dict[str, str] = {}
_reader = None


def config(key: str, value: str) -> None:
    if key == "sitedir":
        # hotspare's virtualenv only: the system's dist-packages hold other versions of the
        # same libraries (urllib3, ...), and a mix of the two does not import.
        sys.path[:] = [p for p in sys.path if "dist-packages" not in p]
        site.addsitedir(value)
    elif key == "path":
        sys.path.insert(0, value)
    elif key in ("store", "root", "cache_mib", "errlog"):
        _args[key] = value
    else:
        raise RuntimeError(f"unknown parameter {key}")


def config_complete() -> None:
    for key in ("store", "root"):
        if key not in _args:
            raise RuntimeError(f"missing parameter {key}=")
    _open_reader()  # here, before nbdkit forks into the background: a bad store or root fails the start


def after_fork() -> None:
    # A daemonised nbdkit forks after config_complete: the store's connections and worker
    # threads did not cross the fork, so open it again in the process that serves.
    _open_reader()


def _open_reader() -> None:
    global _reader
    from hotspare.replica.index import read_root
    from hotspare.replica.reader import ChunkReader
    from hotspare.store import open_store

    store = open_store(_args["store"])
    _reader = ChunkReader(store, read_root(store, _args["root"]), cache_bytes=int(_args.get("cache_mib", "512")) << 20)


def thread_model() -> int:
    return nbdkit.THREAD_MODEL_SERIALIZE_REQUESTS


def open(readonly: bool) -> int:  # noqa: A001 - nbdkit's name
    return 1


def get_size(h: int) -> int:
    return _reader.size


def can_write(h: int) -> bool:
    return False


def can_cache(h: int) -> int:
    return nbdkit.CACHE_EMULATE


def can_multi_conn(h: int) -> bool:
    return True  # read-only: every connection sees the same bytes


def pread(h: int, buf: bytearray, offset: int, flags: int) -> None:
    try:
        buf[:] = _reader.read(offset, len(buf))
    except Exception as err:  # noqa: BLE001 - nbdkit turns this into an EIO for the client
        nbdkit.set_error(5)
        message = f"read of {len(buf)} bytes at {offset}: {err}"
        _log_error(message)
        raise RuntimeError(message) from None


def _log_error(message: str) -> None:
    """A daemonised nbdkit sends its own messages nowhere (stderr is /dev/null after it
    forks): the read errors that a drill or an operator must see go to ``errlog=``."""
    path = _args.get("errlog")
    if path:
        with builtins.open(path, "a") as f:  # this module's ``open`` is nbdkit's callback
            f.write(f"nbdkit: python: pread: error: {message}\n")


def can_extents(h: int) -> bool:
    return True


def extents(h: int, count: int, offset: int, flags: int):
    """Blocks of zeros (never stored) as holes, so qemu-img and block-stream skip them
    instead of reading zeros through Python."""
    cs = _reader.root.chunk_size
    first, last = offset // cs, (offset + count - 1) // cs
    stored = _reader.entries(first, last)["length"] > 0
    out, start = [], first
    for i in range(1, len(stored) + 1):
        if i == len(stored) or stored[i] != stored[i - 1]:
            lo, hi = max(offset, start * cs), min(offset + count, (first + i) * cs)
            out.append((lo, hi - lo, 0 if stored[i - 1] else nbdkit.EXTENT_HOLE | nbdkit.EXTENT_ZERO))
            start = first + i
    return out
