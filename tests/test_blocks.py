"""Every block hotspare registers: saves to and loads from a real Prefect API, and never
shows a secret."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from blocks.policy import MachinePolicy
from blocks.store import HotspareStore
from blocks.vmhost import DockerQemuHostBlock, Ec2HostBlock, LocalQemuHostBlock, resolve_vm_host
from hotspare.errors import UsageError

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.mark.parametrize("block", [
    HotspareStore(url="s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", region="us-east-1",
                  access_key_id="AKIDEXAMPLE", secret_access_key=SecretStr("very-secret-value")),
    MachinePolicy(heartbeat_window=30, auto_approve=True, retention_points=5, host="lab-qemu"),
    LocalQemuHostBlock(qemu="/usr/bin/qemu-system-x86_64", start_timeout=45),
    DockerQemuHostBlock(base_url="unix:///run/hs-docker.sock", image="registry.example/qemu:1"),
    Ec2HostBlock(region="eu-west-1", instance_type="t3.small", access_key_id="AKIDEXAMPLE",
                 secret_access_key=SecretStr("very-secret-value")),
])
def test_block_round_trip_and_secrets(block) -> None:
    name = f"test-{type(block).__name__.lower()}"
    block.save(name, overwrite=True)
    loaded = type(block).load(name)
    assert loaded.model_dump(exclude={"block_document_id", "block_document_name"}) == \
        block.model_dump(exclude={"block_document_id", "block_document_name"})
    for text in (repr(loaded), str(loaded), loaded.model_dump_json()):
        assert "very-secret-value" not in text


def test_policy_block_gives_the_engine_policy() -> None:
    p = MachinePolicy(heartbeat_window=30, auto_approve=True, retention_points=5).policy()
    assert (p.heartbeat_window, p.auto_approve, p.retention_points) == (30, True, 5)


def test_store_block_opens_a_store(tmp_path) -> None:
    st = HotspareStore(url=str(tmp_path / "s")).open()
    st.put("a/b", b"x")
    assert st.get("a/b") == b"x"


def test_a_policy_names_a_vm_host_block() -> None:
    from hotspare.vm.docker import DockerQemuHost
    from hotspare.vm.ec2 import Ec2Host
    from hotspare.vm.local import LocalQemuHost

    LocalQemuHostBlock(qemu="/usr/bin/qemu-system-x86_64", start_timeout=45).save("lab-qemu", overwrite=True)
    DockerQemuHostBlock(base_url="unix:///run/hs-docker.sock", image="registry.example/qemu:1").save(
        "lab-docker", overwrite=True)
    Ec2HostBlock(region="eu-west-1", secret_access_key=SecretStr("s3cr3t"), access_key_id="AKID").save(
        "lab-ec2", overwrite=True)
    local = resolve_vm_host("lab-qemu")
    assert isinstance(local, LocalQemuHost) and local.start_timeout == 45
    docker = resolve_vm_host("lab-docker")
    assert isinstance(docker, DockerQemuHost) and docker.image == "registry.example/qemu:1"
    ec2 = resolve_vm_host("lab-ec2")
    assert isinstance(ec2, Ec2Host) and ec2.config.region == "eu-west-1"
    assert isinstance(resolve_vm_host("local"), LocalQemuHost)
    with pytest.raises(UsageError, match="no VM host block has that name"):
        resolve_vm_host("nowhere")


def test_protect_takes_a_vm_host_block_name(tmp_path) -> None:
    from tests.helpers import cli, random_image

    image = tmp_path / "d.img"
    random_image(image, 1 << 20)
    env = {"HOTSPARE_STORE": str(tmp_path / "s")}
    cli("protect", "m1", "--disk", f"root={image}", "--host", "lab-qemu", env=env)
    r = cli("status", "m1", "--json", env=env)
    assert '"host": "lab-qemu"' in r.stdout
    r = cli("protect", "m1", "--disk", f"root={image}", "--host", "../evil", env=env, check=False)
    assert r.returncode == 1 and "VM host name '../evil' is invalid" in r.stderr
