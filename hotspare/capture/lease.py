"""One shipping agent per machine: a lease in the store (``machines/<m>/agent-lease.json``).

Two agents shipping one machine (started with different state directories, on two hosts)
would cut logs with the same seqs, one set would be refused, and the chain would stall. So
the first agent takes the lease create-only, and renews it with every heartbeat by raising
its ``generation``. Liveness is judged by that counter moving, never by anybody's clock: a
second agent that finds another holder watches the lease for ``patience`` seconds (of its
own monotonic clock); a lease whose generation moved is alive and the newcomer is refused,
one that did not move is stale and taken over (delete, then create-only: of two takers only
one wins). A holder that finds the lease in other hands stops shipping.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ValidationError

from hotspare import layout
from hotspare.errors import AlreadyExists, HotspareError, NotFound
from hotspare.store.base import Store


class LeaseHeld(HotspareError):
    """Another live agent ships this machine."""


class Lease(BaseModel):
    holder: str
    host: str
    state_dir: str
    generation: int = 0


def lease_key(machine: str) -> str:
    return f"{layout.machine_prefix(machine)}agent-lease.json"


def agent_id(state_root: Path) -> str:
    """This state directory's agent id, made once and kept."""
    p = state_root / "agent-id"
    try:
        return p.read_text().strip()
    except FileNotFoundError:
        state_root.mkdir(parents=True, exist_ok=True)
        p.write_text(uuid.uuid4().hex)
        return p.read_text().strip()


class AgentLease:
    def __init__(self, store: Store, machine: str, state_root: Path, *, patience: float = 3.0) -> None:
        self.store = store
        self.machine = machine
        self.key = lease_key(machine)
        self.mine = Lease(holder=agent_id(state_root), host=socket.gethostname(), state_dir=str(state_root))
        self.patience = patience
        self.held = False

    def _read(self) -> Lease | None:
        try:
            raw = self.store.get(self.key)
        except NotFound:
            return None
        try:
            return Lease.model_validate_json(raw)
        except ValidationError:
            return None  # unreadable: treated as stale, replaced below

    def _write(self, *, create_only: bool) -> None:
        self.store.put(self.key, self.mine.model_dump_json().encode(), create_only=create_only)

    def acquire(self) -> None:
        other = self._read()
        if other is not None and other.holder != self.mine.holder:
            # Another agent's lease: alive if its generation moves while we watch.
            deadline = time.monotonic() + self.patience
            while time.monotonic() < deadline:
                time.sleep(min(0.25, self.patience))
                now = self._read()
                if now is None:
                    break  # released by a clean stop
                if (now.holder, now.generation) != (other.holder, other.generation):
                    raise LeaseHeld(f"another agent ships {self.machine}: host {now.host}, state dir "
                                    f"{now.state_dir} (its lease {self.key} is being renewed); stop it first: two "
                                    "agents would cut logs with the same seqs and stall the replica")
            else:
                self.store.delete(self.key)  # it did not move: its agent is gone
            other = None
        self.mine.generation = other.generation if other else 0
        try:
            self._write(create_only=other is None)
        except AlreadyExists:
            raise LeaseHeld(f"another agent took the lease {self.key} of {self.machine} at the same moment; "
                            "stop it first") from None
        self.held = True

    def release(self) -> None:
        """A clean stop frees the lease at once for the next agent."""
        if self.held and (cur := self._read()) is not None and cur.holder == self.mine.holder:
            self.store.delete(self.key)
        self.held = False

    def renew(self) -> None:
        now = self._read()
        if now is not None and now.holder != self.mine.holder:
            self.held = False
            raise LeaseHeld(f"{self.machine}: agent on host {now.host} (state dir {now.state_dir}) took over the lease "
                            f"{self.key}; this agent stops shipping")
        self.mine.generation += 1
        self._write(create_only=False)


def describe(store: Store, machine: str) -> dict | None:
    try:
        return json.loads(store.get(lease_key(machine)))
    except (NotFound, ValueError):
        return None
