"""Append-only version chains in the store: ``<prefix><version>.json``, create-only.

The catalog of a disk and the state of a machine are both such chains. A commit writes
version n+1 create-only, so of two writers racing from version n exactly one wins and the
other gets AlreadyExists (and re-reads). A ``HEAD`` hint names the newest version so that
finding it costs one read and a short listing, not a listing of the whole history; the hint
is only a hint: a crash before it is updated leaves a newer version that the listing finds.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from hotspare.errors import InvalidObject, NotFound, field_error
from hotspare.layout import num, version_of
from hotspare.store.base import Store

M = TypeVar("M", bound=BaseModel)


def _head_key(prefix: str) -> str:
    return prefix + "HEAD"


def latest_version(store: Store, prefix: str) -> int | None:
    """The newest committed version under ``prefix``, or None when there is none."""
    start_after = None
    try:
        hint = int(store.get(_head_key(prefix)).decode().strip())
        start_after = f"{prefix}{num(hint - 1)}.json" if hint > 0 else None
    except (NotFound, ValueError, UnicodeDecodeError):
        pass
    newest = _newest(store, prefix, start_after)
    if newest is None and start_after is not None:
        newest = _newest(store, prefix, None)  # a hint past the real history: ignore it
    return newest


def _newest(store: Store, prefix: str, start_after: str | None) -> int | None:
    newest = None
    for info in store.list(prefix, start_after=start_after):
        if not info.key[len(prefix):len(prefix) + 1].isdigit():
            break  # versions sort first; what follows (HEAD, a catalog's manifests/) is no version
        v = version_of(info.key)
        if v is not None:
            newest = v
    return newest


def load(store: Store, prefix: str, version: int, model: type[M]) -> M:
    key = f"{prefix}{num(version)}.json"
    raw = store.get(key)
    try:
        obj = model.model_validate_json(raw)
    except ValidationError as err:
        raise InvalidObject(key, f"invalid {model.__name__}: {field_error(err)}") from err
    if getattr(obj, "version", version) != version:
        raise InvalidObject(key, f"holds version {getattr(obj, 'version')}, its key says {version}")
    return obj


def load_latest(store: Store, prefix: str, model: type[M]) -> M | None:
    v = latest_version(store, prefix)
    return None if v is None else load(store, prefix, v, model)


def commit(store: Store, prefix: str, obj: BaseModel) -> None:
    """Write ``obj`` (which has a ``version`` field) as its version, create-only.

    Raises AlreadyExists when another writer committed that version first."""
    version = getattr(obj, "version")
    store.put(f"{prefix}{num(version)}.json", obj.model_dump_json(indent=1).encode(), create_only=True)
    store.put(_head_key(prefix), str(version).encode())
