"""The failback controller without Prefect or a VM: plain steps (the engine's ingest and
consolidation, the restoring agent run in-process as the wait), a local store, and the
machine's disk brought to the replica's state phase by phase."""

from __future__ import annotations

import io
import json
from pathlib import Path

from hotspare import layout
from hotspare.extentlog import Extent, write_log
from hotspare.failback.controller import CutOverRequest, FailbackController, FailbackSteps
from hotspare.failback.model import CutOverAnswer, FailbackProgress
from hotspare.failback.orders import Order, RestoreProgress, load_orders
from hotspare.failback.publish import restore_progress
from hotspare.failback.restore import Restorer
from hotspare.ingest import ingest_disk
from hotspare.replica.consolidate import consolidate_disk
from hotspare.state import MachineState, commit_state, load_state, state_history
from hotspare.vm.host import VmHandle
from tests.test_failback_units import MIB, _failed_over

VM_WRITE, CATCH_UP_WRITE, LAST_WRITE = (MIB, b"\x11" * 4096), (2 * MIB, b"\x22" * 8192), (MIB + 65536, b"\x33" * 512)


def vm_log(st, seq: int, write: tuple[int, bytes], size: int) -> None:
    """One capture cycle of the VM (epoch 1): a cut, so a consolidation makes a point of it."""
    sink = io.BytesIO()
    write_log(sink, [Extent(seq=seq, offset=write[0], length=len(write[1]), data=write[1])], machine="m",
              disk="root", epoch=1, disk_size=size)
    st.put(layout.log_key("m", "root", 1, seq, seq), sink.getvalue())


def test_the_controller_runs_every_phase_and_the_disk_ends_as_the_replica(tmp_path: Path) -> None:
    st, cfg, image = _failed_over(tmp_path)
    size, disk = cfg.disks[0].size, cfg.disks[0]
    expected = bytearray(image.read_bytes())  # what shipped, then the VM's writes below
    for off, data in (VM_WRITE, CATCH_UP_WRITE, LAST_WRITE):
        expected[off:off + len(data)] = data
    with open(image, "r+b") as f:  # the machine's unshipped tail: the replica's content replaces it
        f.seek(3 * MIB)
        f.write(b"\xee" * 100)
    handle = VmHandle(host="local-qemu", vm_id="vm-1", machine="m", workdir=str(tmp_path / "vm"), boot_disk="x",
                      format="raw", accel="tcg", serial_log="x")
    commit_state(st, load_state(st, "m").next(vm=handle.model_dump(mode="json"), host="local"))
    vm_log(st, 0, VM_WRITE, size)  # the VM wrote before the machine came back
    agent = Restorer(st, cfg, tmp_path / "agent")
    agent.start()
    agent.heartbeat(force=True)
    seen: dict[str, list] = {"asked": [], "stopped": [], "events": [], "tables": []}

    def wait(store, machine: str, order: Order, timeout: float, silence: float) -> RestoreProgress:
        agent.run(interval=0, once=True)
        if order.label == "phase-1" and not seen["events"].count("catch-up"):
            vm_log(st, 1, CATCH_UP_WRITE, size)  # the VM keeps writing during phase one
        if order.kind == "finish":
            return RestoreProgress(vm_epoch=order.vm_epoch, done=order.version)
        p = restore_progress(store, machine, order.vm_epoch, silence)
        assert p is not None and p.done >= order.version, (order.label, p)
        return p

    def ingest() -> None:
        ingest_disk(st, "m", disk)

    def consolidate() -> None:
        ingest()
        consolidate_disk(st, "m", disk, cfg.policy)

    def ask(req: CutOverRequest) -> CutOverAnswer:
        seen["asked"].append(req)
        return CutOverAnswer(decision="approve", by="ops", why="window")

    def stop_vm(h: VmHandle) -> int:
        seen["stopped"].append(h.vm_id)
        vm_log(st, 2, LAST_WRITE, size)  # shipped while the VM stops
        return 1

    steps = FailbackSteps(wait=wait, ingest=ingest, consolidate=consolidate, ask_cutover=ask, stop_vm=stop_vm,
                          event=lambda name, payload: seen["events"].append(name),
                          table=lambda name, rows, description: seen["tables"].append(name))
    run = FailbackController(st, cfg, load_state(st, "m"), steps, run_id="run-1", workdir=tmp_path / "vm",
                             catch_up_bytes=0, max_catch_up=1)
    assert run.start() is None
    phases = []
    while (result := run.step()) is None:
        phases.append(run.state.phase)
    assert phases == ["cut-over", "phase-two", "verify", "finish"]
    assert result.outcome == "failed-back" and result.epoch == 2, result

    assert image.read_bytes() == bytes(expected), "the disk is the replica's final state, the tail is gone"
    assert [o.label for o in load_orders(st, "m", 1)] == ["phase-1", "catch-up-1", "pre-scan", "phase-2", "verify-0",
                                                          "finish"]
    assert seen["stopped"] == ["vm-1"] and len(seen["asked"]) == 1 and seen["asked"][0].remaining == 0
    assert seen["events"] == ["planned", "phase-one", "catch-up", "vm-stopped", "phase-two", "verified", "finished"]
    assert seen["tables"] == ["plan", "verify", ""]
    chain = [(s.state, s.phase, s.step) for s in state_history(st, "m") if s.flow_run_id == "run-1"]
    assert chain == [("failing-back", "phase-one", "started"), ("failing-back", "phase-one", "phase one applied"),
                     ("failing-back", "cut-over", "approved"), ("failing-back", "phase-two", "vm stopped"),
                     ("failing-back", "verify", "phase two applied"), ("failing-back", "finish", "verified"),
                     ("protected", "", "failed-back")]
    final = load_state(st, "m")
    assert (final.epoch, final.vm, final.approval) == (2, None, {"decision": "approve", "by": "ops", "why": "window"})
    fb = final.failback
    assert fb is not None and fb.vm["vm_id"] == "vm-1" and fb.verified_blocks == size // disk.block_size
    assert fb.scans == {"root": layout.failback_hashes_key("m", 1, "scan-4", "root")}
    assert set(fb.moved) == {"phase one", "phase two"} and fb.moved["phase two"] >= len(LAST_WRITE[1])
    assert fb.downtime_s is not None and fb.cutover_at is not None and fb.finished_at is not None
    # A re-run finds the failback finished.
    again = FailbackController(st, cfg, final, steps, run_id="run-2", workdir=tmp_path / "vm")
    assert again.start().outcome == "already"


def test_a_state_the_dict_era_flow_wrote_still_loads_and_keeps_its_keys(tmp_path: Path) -> None:
    """``MachineState.failback`` was a plain dict: those states load, their values typed, and
    a key this version does not know is carried to the next state."""
    from hotspare.store import open_store

    st = open_store(str(tmp_path / "store"))
    old = {"machine": "m", "version": 3, "state": "failing-back", "epoch": 1, "at": "2024-05-01T10:00:00+00:00",
           "step": "approved", "phase": "cut-over", "flow_run_id": "r", "host": "local", "vm": None,
           "approval": {"decision": "approve", "by": "ops", "why": ""},
           "failback": {"targets": {"root": "/dev/sdb"}, "round": 1, "mismatch": ["disk root differs"],
                        "cutover_at": "2024-05-01T10:00:00.123456+00:00", "estimated_downtime_s": 12.5,
                        "from_a_newer_release": {"x": 1}}}
    st.put(layout.state_key("m", 3), json.dumps(old).encode())
    st.put(layout.state_prefix("m") + "HEAD", b"3")
    ms = load_state(st, "m")
    assert isinstance(ms.failback, FailbackProgress) and ms.phase == "cut-over"
    assert (ms.failback.targets, ms.failback.round, ms.failback.phase_two_round) == ({"root": "/dev/sdb"}, 1, 0)
    assert ms.failback.cutover_at is not None and ms.failback.cutover_at.microsecond == 123456
    nxt = commit_state(st, ms.next(phase="phase-two"))
    stored = json.loads(st.get(layout.state_key("m", 4)))["failback"]
    assert stored["from_a_newer_release"] == {"x": 1} and stored["targets"] == {"root": "/dev/sdb"}
    assert set(old["failback"]) <= set(stored)
    assert MachineState.model_validate_json(st.get(layout.state_key("m", 4))) == nxt
