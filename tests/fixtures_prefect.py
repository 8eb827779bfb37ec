"""A real Prefect server for the test session: ``prefect server start`` on loopback.

Flows run in-process against it, and CLI subprocesses reach it through PREFECT_API_URL, so
every flow run, artifact and automation in the tests goes through a real API. The server
serves its UI too, at the API URL without ``/api``, for the browser test (tests/test_ui.py).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.servers import running_prefect_server


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API URL of a Prefect server started for this session."""
    home = tmp_path_factory.mktemp("prefect-home")
    # The scheduler looks for deployments to schedule every 2 s instead of every 60 s, so a
    # test of a schedule waits seconds (setting from prefect.settings.models.server.services).
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_UI_ENABLED="true", PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2")
    with ExitStack() as stack:
        try:
            url = stack.enter_context(running_prefect_server(home, env, timeout=90, stop_timeout=15))
        except RuntimeError as err:
            pytest.fail(str(err))

        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings

        old = {k: os.environ.get(k) for k in ("PREFECT_API_URL",)}
        os.environ["PREFECT_API_URL"] = url
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_SERVER_ANALYTICS_ENABLED: False}):
            yield url
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
