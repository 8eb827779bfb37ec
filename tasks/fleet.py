"""The fleet's Prefect side: surveying the store, and each machine's lease.

A machine's lease is a Prefect global concurrency limit of one slot, named
``hotspare-machine-<machine>`` (:func:`hotspare.fleet.lease_name`). A fleet run creates it
the first time it meets the machine, so a newly protected machine needs nothing from the
operator; the UI shows it under Concurrency, where an operator can see which run holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from prefect import task

from hotspare import fleet as engine
from hotspare.errors import HotspareError
from tasks.common import resolve_store


class MachineBusy(HotspareError):
    """Another run holds the machine's lease."""


@task(name="survey-fleet", retries=2, retry_delay_seconds=5)
def survey_fleet(store: str | None, store_block: str | None) -> list[engine.Survey]:
    return engine.survey_fleet(resolve_store(store, store_block))


def ensure_lease(machine: str, name: str | None = None) -> str:
    """The machine's concurrency limit (or the limit ``name``), created with one slot if it
    does not exist (an existing one is left as the operator set it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = name or engine.lease_name(machine)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            except ObjectAlreadyExists:
                pass  # another fleet run created it first
    return name


@contextmanager
def machine_lease(machine: str, wait: float) -> Iterator[None]:
    """Hold ``machine``'s lease for the block; MachineBusy when another run still holds it
    after ``wait`` seconds. The lease is renewed while held and expires if its holder dies."""
    from prefect.concurrency.sync import concurrency

    name = ensure_lease(machine)
    with ExitStack() as held:
        try:
            held.enter_context(concurrency(name, occupy=1, timeout_seconds=wait, strict=True))
        except TimeoutError:
            raise MachineBusy(f"machine {machine}: another run holds its lease {name} "
                              f"(waited {wait:g} s); skipped this time") from None
        yield


def publish_fleet_view(st) -> list[dict]:
    """Update the fleet's table artifact (key ``hotspare-fleet``: the UI's Artifacts page
    shows the newest) and emit an event for each dead VM or capture; returns the rows."""
    import warnings

    from prefect.artifacts import create_table_artifact

    from hotspare import fleetview
    from tasks.events import emit_machine_event

    rows = fleetview.fleet_rows(st)
    with warnings.catch_warnings():  # `status --publish` publishes outside a run, on purpose
        warnings.filterwarnings("ignore", "Artifact creation outside of a flow", FutureWarning)
        create_table_artifact(rows or [{"machine": "", "state": "no machine protected"}], key=fleetview.ARTIFACT_KEY,
                              description=f"hotspare fleet in {st.url}: state, heartbeat age, replica lag, newest "
                                          "consistent point, VM and capture health")
    for event, machine, detail in fleetview.dead(rows):
        emit_machine_event(event, machine, payload={"detail": detail})
    return rows


@task(name="publish-fleet-view", retries=2, retry_delay_seconds=5)
def publish_fleet(store: str | None, store_block: str | None) -> int:
    return len(publish_fleet_view(resolve_store(store, store_block)))
