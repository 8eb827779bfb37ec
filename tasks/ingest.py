"""Tasks of the ingest flow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare import ingest
from hotspare.quarantine import quarantine
from hotspare.catalog import Catalog, commit_catalog
from hotspare.errors import InvalidLog
from hotspare.extentlog import LogInfo
from hotspare.machine import DiskSpec
from hotspare.store import Store
from tasks.common import retry_transient


def _batch_name() -> str:
    from prefect.runtime import task_run

    keys = task_run.parameters["keys"]
    first, last = keys[0].rsplit("/", 1)[-1], keys[-1].rsplit("/", 1)[-1]
    return f"validate {len(keys)} log(s) {first}" + (f"..{last}" if len(keys) > 1 else "")


@task(name="validate-logs", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name=_batch_name)
def validate_logs(store: Store, keys: list[str], machine: str, disk: DiskSpec) -> list[LogInfo | InvalidLog]:
    """A batch of logs: each valid log's info, or the InvalidLog that condemns it (returned,
    not raised: a bad log is an outcome of ingest, not a failure of the task). A transient
    store fault fails the task, and its retry validates the whole batch again."""
    return ingest.check_logs(store, keys, machine, disk)


@task(name="quarantine-log", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name="quarantine {key}")
def quarantine_log(store: Store, key: str, reason: str) -> str:
    from prefect.logging import get_run_logger

    qkey = quarantine(store, key, reason)
    get_run_logger().warning("rejected %s", reason)
    return qkey


@task(name="commit-catalog", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name="commit catalog {catalog.machine}/{catalog.disk} v{catalog.version}")
def commit(store: Store, catalog: Catalog) -> Catalog:
    """Commit ``catalog`` (its long tail into manifests first); returns it as committed."""
    return commit_catalog(store, catalog)
