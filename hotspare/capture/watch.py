"""The agent's watch on its contact with the store: no silent stall while the store is away.

A store call that fails is retried for about a minute before it gives up (botocore's own
retries under the store's), so a short outage shows no error at all, only a cycle that
does not end. The watch hears every transient fault as it happens (the store's fault
listeners) and, once no heartbeat has reached the store for longer than the heartbeat
window while such faults come, calls it a stall: it says so in the agent's log, sends a
``hotspare.machine.stalled`` event (Prefect may be reachable when the store is not), and
reminds every window. The first heartbeat that gets through carries the stall as
``last_stall`` and a ``hotspare.machine.resumed`` event follows. A slow cycle without
faults (a seed of a big disk) is not a stall of the store's making and is not called one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from hotspare.errors import HotspareError, TransientStoreError
from hotspare.stall import RESUMED_EVENT, STALLED_EVENT, Stall
from hotspare.store.base import add_fault_listener, remove_fault_listener

Alarm = Callable[[str, dict[str, Any]], None]  # (event name, payload)


class StoreUnreachable(HotspareError):
    """The store stayed away for longer than the agent was told to wait (``give_up_after``)."""


class StoreWatch:
    def __init__(self, machine: str, window: float, *, say: Callable[[str], None], alarm: Alarm | None = None,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.5,
                 give_up_after: float | None = None) -> None:
        self.machine, self.window, self.say, self.alarm = machine, window, say, alarm
        self.give_up_after = give_up_after
        self.clock, self.tick = clock, tick
        self._lock = threading.Lock()
        self._contact = clock()  # when a heartbeat last reached the store (or the watch started)
        self._contact_wall = datetime.now(timezone.utc)
        self._fault: str | None = None  # the latest transient fault since that contact
        self._stalled_at: float | None = None  # when the stall was declared
        self._reminded = 0.0
        self.last_stall: dict[str, Any] | None = None  # the newest stall lived through
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the store's fault listener and the watch thread ----------------------------------
    def fault(self, err: TransientStoreError) -> None:
        """The store's fault listener. Past ``give_up_after`` it raises StoreUnreachable, in
        the thread whose call is being retried: that call, and the agent, give up now
        rather than after the store's own retries (about a minute) run out."""
        with self._lock:
            self._fault = str(err).splitlines()[0]
            away = self.clock() - self._contact
        if self.give_up_after and away > self.give_up_after:
            raise StoreUnreachable(f"{self.machine}: the store has not answered for {away:.0f}s "
                                   f"(--give-up-after {self.give_up_after:g}s): giving up, nothing captured is "
                                   f"lost; the last fault: {self._fault}")

    def __enter__(self) -> StoreWatch:
        add_fault_listener(self.fault)
        self._thread = threading.Thread(target=self._watch, name=f"store-watch-{self.machine}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        remove_fault_listener(self.fault)
        if self._thread is not None:
            self._thread.join(5)

    def _watch(self) -> None:
        while not self._stop.wait(self.tick):
            self.check()

    def unreachable_for(self) -> float:
        """Seconds since the last heartbeat reached the store, if faults came since; else 0."""
        with self._lock:
            return self.clock() - self._contact if self._fault else 0.0

    @property
    def stalled(self) -> bool:
        return self._stalled_at is not None

    def check(self) -> None:
        """Declare a stall, or remind of one, when it is due (the watch thread calls this)."""
        with self._lock:
            silent = self.clock() - self._contact
            if self._fault is None or silent <= self.window:
                return
            first = self._stalled_at is None
            if not first and self.clock() - self._reminded < self.window:
                return
            if first:
                self._stalled_at = self.clock()
            self._reminded = self.clock()
            stall = self._stall(silent)
        self.say(("protection stalled: " if first else "still stalled: ") + stall.detail)
        if first:
            self.send(STALLED_EVENT, dict(stall.payload(), since=self._contact_wall.isoformat()))

    def _stall(self, silent: float) -> Stall:
        return Stall(self.machine, "store-unreachable",
                     f"no heartbeat reached the store for {silent:.0f}s (heartbeat window {self.window:g}s); "
                     f"the store answers: {self._fault}; retrying, nothing captured is lost", seconds=round(silent, 1))

    def ending(self) -> dict[str, Any] | None:
        """What the next heartbeat reports as ``last_stall``: the stall it ends, if it gets
        through, or the newest one lived through."""
        with self._lock:
            if self._stalled_at is None:
                return self.last_stall
            silent = self.clock() - self._contact
            stall = self._stall(silent)
            return dict(stall.payload(), since=self._contact_wall.isoformat(),
                        ended=datetime.now(timezone.utc).isoformat(),
                        detail=f"the store did not answer for {silent:.0f}s (heartbeat window {self.window:g}s): "
                               f"{self._fault}")

    def contact(self, ended: dict[str, Any] | None = None) -> None:
        """A heartbeat reached the store; ``ended`` is what it said of the stall it ended."""
        with self._lock:
            was = self._stalled_at is not None
            self._contact, self._contact_wall = self.clock(), datetime.now(timezone.utc)
            self._fault, self._stalled_at = None, None
            if was and ended is not None:
                self.last_stall = ended
        if was and ended is not None:
            self.say(f"the store answers again after {ended['seconds']:.0f}s; shipping resumed")
            self.send(RESUMED_EVENT, ended)

    def send(self, event: str, payload: dict[str, Any]) -> None:
        if self.alarm is None:
            return
        try:
            self.alarm(event, payload)
        except Exception as err:  # noqa: BLE001 - the event is a courtesy: the log said it already
            self.say(f"event {event} not sent: {err}")
