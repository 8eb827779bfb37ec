"""Tasks of the failback flow: the engine's order publishing and replica hashing
(hotspare.failback.publish) with retries on store I/O when the fault may pass, and the wait
for the restoring agent with a progress artifact."""

from __future__ import annotations

import time

from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from hotspare.errors import HotspareError
from hotspare.failback import publish as engine
from hotspare.failback.orders import Order, RestoreProgress
from hotspare.failback.publish import restore_progress
from hotspare.store import Store
from tasks.common import retry_transient

STORE_RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
ERROR_GRACE = 15.0  # seconds an agent's error may last (a store blip) before the run fails

publish_apply = task(engine.publish_apply, name="publish-apply", **STORE_RETRY)
publish = task(engine.publish, name="publish-order", **STORE_RETRY)
hash_replica = task(engine.hash_replica, name="replica-hashes", **STORE_RETRY)


@task(name="wait-for-agent", cache_policy=NO_CACHE)
def wait_for_agent(store: Store, machine: str, order: Order, timeout: float, silence: float) -> RestoreProgress:
    """Poll the agent's heartbeat until it reports ``order`` done, with a progress artifact
    for apply orders. Fails when the agent stays silent or keeps reporting an error."""
    artifact = None
    if order.kind == "apply" and order.bytes:
        artifact = create_progress_artifact(0.0, description=f"{machine}: {order.label}, {order.bytes} bytes to apply")
    deadline = time.monotonic() + timeout
    silent_since = error_since = None
    while True:
        if order.kind == "finish" and engine.resumed(store, order):
            return RestoreProgress(vm_epoch=order.vm_epoch, done=order.version)
        p = restore_progress(store, machine, order.vm_epoch, max_age=silence)
        now = time.monotonic()
        if p is not None and p.done >= order.version:
            if artifact:
                update_progress_artifact(artifact, 100.0)
            return p
        if p is None:
            silent_since = silent_since or now
            if now - silent_since > silence:
                raise HotspareError(f"{machine}'s agent stopped reporting in restore mode for {silence:.0f}s during "
                                    f"{order.label}; restart it with --restore and re-run the failback")
        else:
            silent_since = None
            if p.working == order.version and artifact:
                update_progress_artifact(artifact, min(99.9, 100.0 * p.applied_bytes / order.bytes))
            error_since = (error_since or now) if p.error else None
            if error_since and now - error_since > ERROR_GRACE:
                raise HotspareError(f"{machine}'s agent cannot carry out {order.label}: {p.error}")
        if now > deadline:
            raise HotspareError(f"{machine}'s agent did not finish {order.label} within {timeout:.0f}s")
        time.sleep(0.5)
