"""The object-store layer: one interface (:class:`Store`), two backends, one URL to pick.

Store URLs:
- ``s3://bucket/prefix``: :class:`S3Store` (endpoint and credentials from the arguments,
  else the usual AWS environment variables such as ``AWS_ENDPOINT_URL``);
- ``file:///abs/path`` or a plain path: :class:`LocalStore` (the directory is created);
- nothing: ``$HOTSPARE_STORE``, else ``./.hotspare/store``.

boto3 is imported only when an S3 store is used (``S3Store`` is loaded on first access).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from hotspare.errors import UsageError
from hotspare.store.base import CopyRange, ObjectInfo, Segment, Store, check_key, check_prefix
from hotspare.store.local import LocalStore

if TYPE_CHECKING:
    from hotspare.store.s3 import S3Store

__all__ = [
    "CopyRange",
    "LocalStore",
    "ObjectInfo",
    "S3Store",
    "Segment",
    "Store",
    "check_key",
    "check_prefix",
    "open_store",
    "DEFAULT_STORE",
]

#: The embedded default: a directory beside where hotspare runs.
DEFAULT_STORE = "./.hotspare/store"
ENV_VAR = "HOTSPARE_STORE"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
# S3's rule for bucket names, with the upper case that older buckets and some servers allow.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def __getattr__(name: str) -> Any:
    if name == "S3Store":
        from hotspare.store.s3 import S3Store

        return S3Store
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def open_store(
    url: str | None = None,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
) -> Store:
    """The store a URL names (see the module docstring); raises UsageError for a bad URL.

    The S3 settings are ignored for a local store.
    """
    if url is None:
        url = os.environ.get(ENV_VAR) or DEFAULT_STORE
    url = url.strip()
    if not url:
        raise UsageError("store URL is empty: give s3://bucket/prefix, file:///path or a directory")
    m = _SCHEME.match(url)
    # A one-letter "scheme" would be a Windows drive (C:\...): treat it as a path.
    scheme = m.group(1).lower() if m and len(m.group(1)) > 1 else ""
    if scheme == "s3":
        parts = urlsplit(url)
        if not url.lower().startswith("s3://") or parts.query or parts.fragment:
            raise UsageError(f"store URL {url!r} is invalid: expected s3://bucket/prefix")
        bucket = parts.netloc
        if not _BUCKET.match(bucket):
            raise UsageError(
                f"store URL {url!r}: bucket name {bucket!r} is invalid "
                "(3-63 letters, digits, '.', '-' or '_', starting and ending with a letter or digit)"
            )
        from hotspare.store.s3 import S3Store

        return S3Store(
            bucket,
            unquote(parts.path),
            endpoint_url=endpoint_url,
            region=region,
            access_key_id=access_key_id,
            secret_access_key=secret_access_key,
        )
    if scheme == "file":
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/") or parts.query:
            raise UsageError(f"store URL {url!r} is invalid: expected file:///absolute/path")
        return LocalStore(unquote(parts.path))
    if scheme:
        raise UsageError(
            f"store URL {url!r} is not supported: use s3://bucket/prefix, file:///path or a directory path"
        )
    return LocalStore(url)
