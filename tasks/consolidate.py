"""Tasks of the consolidate flow: each wraps one engine step with retries on store I/O."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare.catalog import Catalog, commit_catalog
from hotspare.replica.build import PartJob, PartResult, run_part
from hotspare.store import Store
from tasks.common import retry_transient

RETRY = dict(retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient, cache_policy=NO_CACHE)


def _part_name() -> str:
    from prefect.runtime import task_run

    job: PartJob = task_run.parameters["job"]
    return f"build {job.disk} pages {job.pages[0]}..{job.pages[-1]}"


@task(name="build-parts", task_run_name=_part_name, **RETRY)
def build_parts(store: Store, job: PartJob) -> PartResult:
    """Build a run of index pages: new chunks into new packs, new pages (all create-only under
    a fresh token, so a retry writes beside what a failed try left, and GC removes that)."""
    return run_part(store, job)


@task(name="commit-catalog", **RETRY)
def commit(store: Store, catalog: Catalog) -> Catalog:
    return commit_catalog(store, catalog)
