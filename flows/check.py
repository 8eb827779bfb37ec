"""The check flow: prove that the store is whole (:func:`hotspare.check.check_store`), publish
its findings as a table artifact, and fail when something is damaged.

Repairable findings (garbage) leave the run completed, with a warning: the next consolidation
removes them.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from hotspare.check import CheckReport, check_store
from hotspare.errors import HotspareError
from tasks.common import resolve_store


@flow(name="check", flow_run_name="check {machine}")
def check(machine: str | None = None, store: str | None = None, store_block: str | None = None,
          read_data: float = 0.0) -> CheckReport:
    """Check ``machine`` (every machine of the store when None); ``read_data``: the fraction
    of packs and logs whose data is read and hashed (0: metadata only, 1: all)."""
    logger = get_run_logger()
    st = resolve_store(store, store_block)
    report = check_store(st, machine, read_data=read_data, say=logger.info)
    rows = [{"severity": f.severity, "object": f.key, "reason": f.reason, "points": ", ".join(f.points),
             "repair": f.repair} for f in report.findings]
    create_table_artifact(rows or [{"severity": "clean", "object": "", "reason": report.summary(), "points": "",
                                    "repair": ""}],
                          key="check-" + "".join(c if c.isalnum() else "-" for c in (machine or "store").lower()),
                          description=report.summary())
    for f in report.findings:
        (logger.error if f.severity == "damaged" else logger.warning)("%s", f.line())
    if report.verdict == "damaged":
        raise HotspareError(report.summary())
    logger.info("%s", report.summary())
    return report
