"""VM host blocks: where a failed-over machine's VM runs, configured in the Prefect UI.

A machine's policy names its host: ``local``, ``docker`` or ``ec2`` (configured from the
environment), or the name of one of these blocks. Blocks hold configuration only; ``host()``
hands out the engine's host object.
"""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field

from hotspare import failover as engine
from hotspare.errors import UsageError
from hotspare.vm.ec2.config import Ec2HostConfig
from hotspare.vm.host import VmHost


class LocalQemuHostBlock(Block):
    """QEMU on the machine that runs the failover flow."""

    _block_type_name = "hotspare-local-qemu"
    _block_type_slug = "hotspare-local-qemu"
    _description = "Run failed-over VMs with QEMU on the flow's machine."
    _code_example = """\
    ```python
    from blocks.vmhost import LocalQemuHostBlock

    host = LocalQemuHostBlock.load("BLOCK_NAME").host()  # a hotspare.vm.host.VmHost
    ```
    """

    qemu: str = Field("qemu-system-x86_64", title="QEMU binary", description='QEMU system emulator to run (a name on PATH or a path).')
    start_timeout: float = Field(30.0, gt=0, title="Start timeout (s)", description="Seconds the VM's QEMU has to start and answer on QMP.")

    def host(self) -> VmHost:
        from hotspare.vm.qemu.local import LocalQemuHost

        return LocalQemuHost(self.qemu, start_timeout=self.start_timeout)


class DockerQemuHostBlock(Block):
    """QEMU inside a container of a Docker daemon (image: deployments/docker/)."""

    _block_type_name = "hotspare-docker-qemu"
    _block_type_slug = "hotspare-docker-qemu"
    _description = "Run failed-over VMs with QEMU in Docker containers."
    _code_example = """\
    ```python
    from blocks.vmhost import DockerQemuHostBlock

    host = DockerQemuHostBlock.load("BLOCK_NAME").host()  # a hotspare.vm.host.VmHost
    ```
    """

    base_url: str | None = Field(None, title="Docker daemon", description='Docker daemon, e.g. unix:///var/run/docker.sock; empty: DOCKER_HOST.')
    image: str = Field("hotspare/qemu-runner:bookworm", title="Runner image", description='Image of the QEMU runner container (built from deployments/docker).')

    def host(self) -> VmHost:
        from hotspare.vm.qemu.docker import DockerQemuHost

        return DockerQemuHost(self.base_url, image=self.image)


class Ec2HostBlock(Ec2HostConfig, Block):
    """EC2 instances in one region; credentials as secrets (empty: the standard AWS chain).
    Its fields are :class:`hotspare.vm.ec2.config.Ec2HostConfig`'s."""

    _block_type_name = "hotspare-ec2-host"
    _block_type_slug = "hotspare-ec2-host"
    _description = "Run failed-over VMs as EC2 instances."
    _code_example = """\
    ```python
    from blocks.vmhost import Ec2HostBlock

    host = Ec2HostBlock.load("BLOCK_NAME").host()  # a hotspare.vm.host.VmHost
    ```
    """

    def host(self) -> VmHost:
        from hotspare.vm.ec2.host import Ec2Host

        return Ec2Host(Ec2HostConfig.model_validate(self.model_dump(include=set(Ec2HostConfig.model_fields))))


BLOCK_TYPES: tuple[type[Block], ...] = (LocalQemuHostBlock, DockerQemuHostBlock, Ec2HostBlock)


def resolve_vm_host(name: str) -> VmHost:
    """The host a policy names: a built-in kind, or a VM host block of that name."""
    if name in engine.BUILTIN_HOSTS:
        return engine.vm_host(name)
    from prefect.exceptions import ObjectNotFound

    for block_type in BLOCK_TYPES:
        try:
            return block_type.load(name).host()
        except (ValueError, ObjectNotFound):
            continue
    raise UsageError(f"VM host {name!r}: not local, docker or ec2, and no VM host block has that name "
                     f"(block types: {', '.join(b.get_block_type_slug() for b in BLOCK_TYPES)})")
