"""What every task shares: how a flow's store parameters become a Store, and which
errors are worth a retry."""

from __future__ import annotations

from hotspare.errors import StoreError
from hotspare.store import Store, open_store


def resolve_store(store: str | None = None, store_block: str | None = None) -> Store:
    """A store from a URL (or ``HOTSPARE_STORE``, or the embedded default), or from a
    saved ``hotspare-store`` block, whose credentials never leave the block unmasked."""
    if store_block:
        from blocks.store import HotspareStore

        return HotspareStore.load(store_block).open()
    return open_store(store)


def retry_transient(task, task_run, state) -> bool:
    """Retry only faults that may pass (throttling, timeouts, 5xx); a bad object or a
    lost create-only race fails at once."""
    try:
        state.result()
    except StoreError as err:
        return err.transient
    except Exception:
        return False
    return False
