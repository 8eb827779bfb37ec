"""Tasks of the consolidate flow: each wraps one engine step with retries on store I/O."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare.consolidate import point as engine
from hotspare.consolidate.build import PartJob, run_job
from hotspare.store import Store
from hotspare.store.base import PartReceipt
from tasks.common import retry_transient

RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)


@task(name="build-parts", task_run_name="build {job.key} parts {job.windows[0].number}+", **RETRY)
def build_parts(store: Store, job: PartJob) -> list[PartReceipt]:
    """Build and upload a batch of changed parts (rewriting a part is idempotent)."""
    return run_job(store, job)


@task(name="copy-parts", **RETRY)
def copy_parts(store: Store, build: engine.VhdBuild, token: str) -> list[PartReceipt]:
    """The unchanged windows, copied on the server from the previous VHD."""
    return [engine.copy_window(store, build, token, w.number) for w in build.plan.windows if w.copy]


@task(name="publish-vhd", **RETRY)
def publish(store: Store, build: engine.VhdBuild, token: str, receipts: list[PartReceipt]) -> None:
    engine.finish_build(store, build, token, receipts)
