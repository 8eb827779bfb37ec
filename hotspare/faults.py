"""Crash points for fault-injection tests.

``crash_point("name")`` kills the process with SIGKILL, as a power cut would, when the
environment variable ``HOTSPARE_CRASH_AT`` names that point. Tests use it to prove that a
re-run after a crash at exactly that line converges; in normal runs it costs a dict lookup.
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    if os.environ.get("HOTSPARE_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
