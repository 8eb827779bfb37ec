"""The machine policy block: how a protected machine is watched, failed over and kept."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from hotspare.machine import DRILL_PATTERN, Policy


class MachinePolicy(Block):
    """Heartbeat window, approval, VM host and size, retention of one protected machine
    (or of a class of machines: a policy block can be shared)."""

    _block_type_name = "hotspare-machine-policy"
    _block_type_slug = "hotspare-machine-policy"
    _description = "How hotspare watches, fails over and retains a protected machine."
    _code_example = """\
    ```python
    from blocks.policy import MachinePolicy

    policy = MachinePolicy.load("BLOCK_NAME").policy()  # a hotspare.machine.Policy
    ```
    """

    heartbeat_window: int = Field(60, ge=10, title="Heartbeat window (s)",
                                  description="Seconds without a heartbeat before the machine counts as down.")
    rpo: int = Field(900, ge=10, title="RPO (s)",
                     description="Seconds a shipped log may wait to be accepted before the machine counts as stalled.")
    auto_approve: bool = Field(False, title="Auto-approve",
                               description="Fail over and cut over without waiting for an operator.")
    approval_timeout: int = Field(3600, ge=1, title="Approval timeout (s)",
                                  description="Seconds to wait for an approval; then the request is rejected.")
    host: str = Field("local", title="VM host", description="local, docker, ec2, or the name of a VM host block.")
    vm_cpus: int = Field(1, ge=1, title="VM CPUs")
    vm_memory_mib: int = Field(512, ge=64, title="VM memory (MiB)")
    retention_points: int = Field(24, ge=1, title="Recovery points kept")
    retention_hours: float = Field(24.0, gt=0, title="Retention (hours)",
                                   description="Age of the oldest recovery point kept.")
    notify_block: str = Field("", title="Notification block",
                              description="A notification block (TYPE-SLUG/NAME, or NAME of a custom-webhook block) "
                                          "that approval requests notify, applied by `hotspare deploy`.")

    drill_pattern: str = Field(DRILL_PATTERN, title="Drill: console pattern",
                               description="Regular expression a drilled VM must print on its serial console.")
    drill_probes: list[str] = Field(default_factory=list, title="Drill: probe commands",
                                    description="Commands run on the drill's host after the pattern showed; each "
                                                "must exit 0 (env: HOTSPARE_DRILL_SERIAL, HOTSPARE_DRILL_QMP, "
                                                "HOTSPARE_DRILL_VM).")
    drill_timeout: float = Field(300.0, gt=0, title="Drill: boot timeout (s)",
                                 description="Seconds a drilled VM has to show its boot evidence.")

    def policy(self) -> Policy:
        return Policy(**{name: getattr(self, name) for name in Policy.model_fields})
