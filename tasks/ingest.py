"""Tasks of the ingest flow."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare import ingest
from hotspare.catalog import Catalog, commit_catalog
from hotspare.errors import InvalidLog
from hotspare.extentlog import LogInfo
from hotspare.machine import DiskSpec
from hotspare.store import Store
from tasks.common import retry_transient


@task(name="validate-log", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name="validate {key}")
def validate_log(store: Store, key: str, machine: str, disk: DiskSpec) -> LogInfo | InvalidLog:
    """A valid log's info, or the InvalidLog that condemns it (returned, not raised:
    a bad log is an outcome of ingest, not a failure of the task)."""
    try:
        return ingest.check_log(store, key, machine, disk)
    except InvalidLog as err:
        return err


@task(name="quarantine-log", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name="quarantine {key}")
def quarantine_log(store: Store, key: str, reason: str) -> str:
    from prefect.logging import get_run_logger

    qkey = ingest.quarantine(store, key, reason)
    get_run_logger().warning("rejected %s", reason)
    return qkey


@task(name="commit-catalog", retries=3, retry_delay_seconds=[1, 4, 15], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE, task_run_name="commit catalog {catalog.machine}/{catalog.disk} v{catalog.version}")
def commit(store: Store, catalog: Catalog) -> int:
    commit_catalog(store, catalog)
    return catalog.version
