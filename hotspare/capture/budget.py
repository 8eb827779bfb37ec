"""A CPU budget for the agent: at most a share of one CPU, averaged, so that a burst of writes
does not also cost the machine its CPUs to its own replication.

A token bucket over the process's CPU time (every thread, ``time.process_time``): the budget
grows by ``share`` CPU-seconds per second of wall time, up to ``burst``, and the agent's
work spends it. :meth:`CpuBudget.pace`, called between reads of a view, sleeps while the
bucket is in debt. Sleeping delays the cut, so under such a load the RPO grows (and shows,
as the age of the newest cut, in ``status`` and the heartbeat); it never loses a write: the
bitmap goes on recording.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class CpuBudget:
    """``share``: CPU-seconds per second (0.5 is half of one CPU); None: no limit."""

    def __init__(self, share: float | None, *, burst: float = 0.1, clock: Callable[[], float] = time.monotonic,
                 cpu: Callable[[], float] = time.process_time, sleep: Callable[[float], None] = time.sleep) -> None:
        if share is not None and not share > 0:
            raise ValueError(f"a CPU budget must be more than 0 CPUs, not {share}")
        self.share = share
        self.burst = burst
        self._clock, self._cpu, self._sleep = clock, cpu, sleep
        self._t, self._used = clock(), cpu()
        self.tokens = burst
        self.slept = 0.0  # seconds paced, in all

    def pace(self) -> None:
        if self.share is None:
            return
        now, used = self._clock(), self._cpu()
        self.tokens = min(self.burst, self.tokens + (now - self._t) * self.share) - (used - self._used)
        self._t, self._used = now, used
        if self.tokens < 0:  # the sleep's wall time pays the debt back at the next call
            wait = -self.tokens / self.share
            self._sleep(wait)
            self.slept += wait
