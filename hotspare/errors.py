"""Errors hotspare raises on purpose.

Every expected fault is a :class:`HotspareError`: its message names the object (a store key,
a file, a machine) and the reason, and the CLI prints it in one line without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
from typing import Literal


class HotspareError(Exception):
    """An expected fault, reported to the user as one clear line."""


class UsageError(HotspareError):
    """A bad argument or configuration given by the user."""


# How a failover or failback run ended (its result's ``outcome``): done, done by an earlier
# run (a re-run), or one of the errors below.
Outcome = Literal["failed-over", "failed-back", "already", "refused", "rejected", "timed-out", "lost-race"]


class OutcomeError(HotspareError):
    """An orchestration outcome that callers branch on; the CLI exits with ``exit_code``
    (README, "Exit codes")."""

    exit_code = 1


class Refused(OutcomeError):
    """The machine is not in a state for this step (failing back a machine that is not
    failed over, or whose agent is not in restore mode; failing over one that fails back)."""

    exit_code = 4


class MachineLive(Refused):
    """The machine still sends heartbeats: failing over would make two writers."""


class NotApproved(OutcomeError):
    """The operator rejected the step, or nobody answered by the deadline."""

    exit_code = 5


class VmFailed(OutcomeError):
    """The VM died or failed its checks after its launch (it was stopped)."""

    exit_code = 6


class LostRace(OutcomeError):
    """Another run moved the machine's state (or committed the same object) first."""

    exit_code = 7


class StoreError(HotspareError):
    """A store operation failed. ``transient`` says whether retrying may help."""

    transient = False

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


class TransientStoreError(StoreError):
    """Throttling, a timeout, a 5xx: the same call may succeed later."""

    transient = True


class NotFound(StoreError):
    def __init__(self, key: str, reason: str = "no such object") -> None:
        super().__init__(key, reason)


class AlreadyExists(StoreError):
    """A create-only write found the key taken (another writer won the race)."""

    after_retry = False  # the refusal answered a retry of a try that failed in transit

    def __init__(self, key: str, reason: str = "already exists (create-only write refused)") -> None:
        super().__init__(key, reason)


class StagingError(HotspareError):
    """A capture could not write a log where it stages it before the upload (a full or
    read-only state directory). Nothing was shipped and nothing is lost: the next cycle
    sends the same blocks."""

    def __init__(self, where: str, err: OSError) -> None:
        self.where = where
        why = os.strerror(err.errno) if err.errno else str(err)
        super().__init__(f"cannot stage a log in {where}: {why} (each log is written there whole before its "
                         "upload; make room there or give the agent another --state-dir)")


class InvalidLog(HotspareError):
    """An extent log that breaks a rule of the format; it goes to quarantine."""

    def __init__(self, key: str, reason: str, row: int | None = None) -> None:
        self.key = key
        self.reason = reason
        self.row = row
        self.detail = f"row {row}: {reason}" if row is not None else reason
        super().__init__(f"{key}: {self.detail}")

    def __reduce__(self):  # picklable with its fields (a task's error crosses to its flow)
        return (type(self), (self.key, self.reason, self.row))


class InvalidObject(HotspareError):
    """A catalog, machine or state file in the store that does not parse or validate."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


def field_error(err: Exception) -> str:
    """The first fault of a pydantic ValidationError as ``field.path: message``: one line."""
    first = err.errors()[0]  # type: ignore[attr-defined]
    return f"{'.'.join(map(str, first['loc'])) or 'document'}: {first['msg']}"
