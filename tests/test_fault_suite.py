"""The fault suite's short tier (tests/faultsuite.py says what it does;
``HOTSPARE_FAULT_SUITE=long`` runs the long one). It prints its figures in one line, and
that line must say nothing was lost or stalled silently."""

from __future__ import annotations

import os
import random
import time
import uuid
from pathlib import Path

import pytest

from hotspare.store.s3 import S3Store
from tests import faultsuite
from tests.faultproxy import FaultProxy


@pytest.mark.timeout(3600 if faultsuite.LONG else 1200)  # about 7 minutes here; the long tier about 25
def test_fault_suite_loses_nothing_and_stalls_nothing_silently(tmp_path: Path, s3_env, prefect_api: str,
                                                             demo_disk: Path, monkeypatch: pytest.MonkeyPatch,
                                                             record_property) -> None:
    bucket = f"hotspare-test-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=bucket)
    url = f"s3://{bucket}/root"
    direct = S3Store(bucket, "root", endpoint_url=s3_env.endpoint_url)
    proxy = FaultProxy(s3_env.endpoint_url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)  # the suite's own steps go through the proxy too
    t0 = time.monotonic()
    try:
        figures = faultsuite.run(tmp_path, direct, url, proxy, faultsuite.suite_env(tmp_path, url, proxy.url))
    finally:
        proxy.close()
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    # Failovers and failbacks of a machine that boots, killed at random moments (local store).
    rng = random.Random(int(os.environ.get("HOTSPARE_SUITE_SEED", "11")))
    faultsuite.failover_kills(tmp_path, demo_disk, figures, rng, 8 if faultsuite.LONG else 2)
    faultsuite.failback_kills(tmp_path, demo_disk, figures, rng, 4 if faultsuite.LONG else 1)
    line = figures.line()
    kills = "; ".join(n for n in figures.notes if " killed after " in n)
    record_property("fault suite", f"{line} ({figures.random_kills} of them kills at random moments; "
                                   f"{time.monotonic() - t0:.0f}s) [{kills}]")  # conftest prints it in the summary
    assert figures.faults >= 25, line
    assert figures.crash_points == len(faultsuite.CRASHES) + len(faultsuite.QEMU_CRASHES), line
    assert figures.random_kills >= 4, (line, figures.notes)
    assert figures.stalls_reported >= 1, "the damaged log's hole was reported as a stall"
    assert line.endswith(", 0 bytes lost, 0 silent stalls"), (line, figures.notes)
