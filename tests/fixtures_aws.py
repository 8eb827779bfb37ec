"""Fixtures for the EC2 host against moto's in-process EC2 and EBS (``mock_aws``).

Import them from conftest.py: ``from tests.fixtures_aws import aws, ec2_host  # noqa: F401``.

- ``aws``: moto's EC2 and EBS for one test, with dummy credentials and every other ``AWS_*``
  variable removed: nothing can reach a real account. S3 is never mocked.
- ``ec2_host``: an :class:`~hotspare.vm.ec2.host.Ec2Host` in :data:`REGION` on it, polling fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from hotspare.vm.ec2.host import Ec2Host

REGION = "eu-west-1"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    moto = pytest.importorskip("moto")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    with moto.mock_aws():
        yield


@pytest.fixture
def ec2_host(aws: None) -> Ec2Host:
    from hotspare.vm.ec2.host import Ec2Host, Ec2HostConfig  # boto3: only for the tests that use it

    return Ec2Host(Ec2HostConfig(region=REGION, poll_interval=0.01, boot_timeout=10, snapshot_timeout=10))
