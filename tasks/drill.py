"""Tasks of the drill flow, and the drill's lease.

A machine's drill lease is a Prefect global concurrency limit of one slot named
``hotspare-drill-<machine>``, apart from the machine's fleet lease: a drill may run while
ingest and consolidation go on, but two drills of one machine never run at once. Its lease
lasts 60 s (the server's minimum) and is renewed while held, so a drill killed with -9
blocks the next one for about a minute, not five.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from hotspare import drill as engine
from hotspare.catalog import DrillVerdict
from hotspare.errors import HotspareError
from hotspare.machine import MachineConfig
from hotspare.store import Store
from blocks.vmhost import resolve_vm_host
from tasks.common import retry_transient
from tasks.fleet import ensure_lease

LEASE_SECONDS = 60


class DrillBusy(HotspareError):
    """Another drill of the machine holds its drill lease."""


def drill_lease_name(machine: str) -> str:
    return f"hotspare-drill-{machine}"


@contextmanager
def drill_lease(machine: str, wait: float) -> Iterator[None]:
    """Hold ``machine``'s drill lease for the block; DrillBusy when another drill still
    holds it after ``wait`` seconds."""
    from prefect.concurrency.sync import concurrency

    name = ensure_lease(machine, drill_lease_name(machine))
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=wait, strict=True,
                                           lease_duration=LEASE_SECONDS))
        except TimeoutError:
            raise DrillBusy(f"machine {machine}: another drill holds {name} (waited {wait:g} s)") from None
        yield


@task(name="boot-point", cache_policy=NO_CACHE)
def boot_point(store: Store, cfg: MachineConfig, workdir: Path, point: str | None, at: datetime | None,
               timeout: float | None) -> engine.DrillOutcome:
    """Boot the point in the drill directory, wait for its evidence, tear it down (no
    retries: the outcome is the verdict)."""
    return engine.drill(store, cfg, resolve_vm_host(cfg.policy.host), workdir, point_id=point, at=at,
                        timeout=timeout)


@task(name="record-verdict", retries=3, retry_delay_seconds=[2, 8, 30], retry_condition_fn=retry_transient,
      cache_policy=NO_CACHE)
def record_verdict(store: Store, cfg: MachineConfig, points: dict[str, str], verdict: DrillVerdict) -> dict[str, int | None]:
    return engine.record_verdict(store, cfg, points, verdict)
