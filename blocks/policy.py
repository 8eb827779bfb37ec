"""The machine policy block: how a protected machine is watched, failed over and kept."""

from __future__ import annotations

from prefect.blocks.core import Block

from hotspare.machine import Policy


class MachinePolicy(Policy, Block):
    """Heartbeat window, approval, VM host and size, retention of one protected machine
    (or of a class of machines: a policy block can be shared). Its fields and their checks
    are :class:`hotspare.machine.Policy`'s, so the block and the engine never disagree."""

    _block_type_name = "hotspare-machine-policy"
    _block_type_slug = "hotspare-machine-policy"
    _description = "How hotspare watches, fails over and retains a protected machine."
    _code_example = """\
    ```python
    from blocks.policy import MachinePolicy

    policy = MachinePolicy.load("BLOCK_NAME").policy()  # a hotspare.machine.Policy
    ```
    """

    def policy(self) -> Policy:
        return Policy.model_validate(self.model_dump(include=set(Policy.model_fields)))
