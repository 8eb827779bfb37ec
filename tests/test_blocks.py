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
    from hotspare.vm.ec2.host import Ec2Host
    from hotspare.vm.qemu.docker import DockerQemuHost
    from hotspare.vm.qemu.local import LocalQemuHost

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


# --- Blocks out of the box: `hotspare deploy` registers the types, and every command and
# import path that README, prefect.yaml or a block names exists.

import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from blocks import block_types  # noqa: E402
from tests.helpers import PREFECT  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMAND = re.compile(r"(?:^|[\s`(])(hotspare|prefect)((?: [a-z][a-z0-9-]*)+)")
IMPORT = re.compile(r"from [\w.]+ import [\w, ]+")


def _code(text: str) -> list[str]:
    """The code in a text: fenced blocks and inline backtick spans."""
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def _block_texts() -> list[str]:
    out = []
    for bt in block_types():
        out += [bt.get_description() or "", bt.get_code_example() or "", bt.__doc__ or ""]
        out += [f.description or "" for f in bt.model_fields.values()]
    return out


def _named() -> dict[str, list[str]]:
    """Where each source names code: README, prefect.yaml (its comments and values), blocks."""
    return {"README.md": _code((REPO / "README.md").read_text()),
            "deployments/prefect.yaml": _code((REPO / "deployments" / "prefect.yaml").read_text()),
            "block descriptions": [c for t in _block_texts() for c in _code(t)]}


def _commands() -> dict[tuple[str, ...], str]:
    found = {}
    for source, snippets in _named().items():
        for snippet in snippets:
            for line in snippet.splitlines():
                for prog, words in COMMAND.findall(line):
                    found.setdefault((prog, *words.split()), source)
    return found


def test_the_docs_name_commands_and_imports() -> None:
    """The scan below finds what it must check (a scan that finds nothing proves nothing)."""
    commands = _commands()
    assert ("hotspare", "deploy") in commands and ("prefect", "worker", "start") in commands
    assert any(c[:2] == ("prefect", "deploy") for c in commands)
    assert any("from blocks.store import HotspareStore" in s for ss in _named().values() for s in ss)


def test_every_hotspare_command_the_docs_name_exists() -> None:
    import typer

    from hotspare.cli import app

    root = typer.main.get_command(app)
    missing = []
    for (prog, *words), source in sorted(_commands().items()):
        if prog != "hotspare":
            continue
        group = root
        first = True
        for w in words:
            sub = getattr(group, "commands", {}).get(w)
            if sub is None:
                if first:
                    missing.append(f"{source}: `hotspare {' '.join(words)}`: no command {w!r}")
                break
            group, first = sub, False
    assert not missing, "\n".join(missing)


def test_every_prefect_command_the_docs_name_exists() -> None:
    missing = []
    for (prog, *words), source in sorted(_commands().items()):
        if prog != "prefect":
            continue
        r = subprocess.run([PREFECT, *words, "--help"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            missing.append(f"{source}: `prefect {' '.join(words)}` does not exist: {(r.stderr or r.stdout)[-300:]}")
    assert not missing, "\n".join(missing)


def test_every_import_the_docs_and_blocks_name_works(tmp_path) -> None:
    """Each import line, run in a fresh interpreter outside the repository (as a user's
    script or a worker would), from README, prefect.yaml and every block's code example."""
    lines = sorted({m for ss in _named().values() for s in ss for m in IMPORT.findall(s)})
    for bt in block_types():
        example = bt.get_code_example() or ""
        assert f"import {bt.__name__}" in example, f"block {bt.get_block_type_slug()}: its code example " \
                                                   f"does not import {bt.__name__}:\n{example}"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for line in lines:
        r = subprocess.run([sys.executable, "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == 0, f"`{line}` fails: {r.stderr[-500:]}"


def test_hotspare_deploy_registers_the_block_types(prefect_api: str, tmp_path) -> None:
    """With none of hotspare's block types on the server, `hotspare deploy` registers them
    all, and the snippet each one's page shows imports."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tests.helpers import cli
    from tests.test_deployments import deploy
    from tests.test_failover import _drop_automations

    slugs = [bt.get_block_type_slug() for bt in block_types()]
    with get_client(sync_client=True) as client:
        for slug in slugs:
            try:
                bt = client.read_block_type_by_slug(slug)
            except ObjectNotFound:
                continue
            for doc in client.read_block_documents_by_type(slug):
                client.delete_block_document(doc.id)
            client.delete_block_type(bt.id)
        for slug in slugs:
            with pytest.raises(ObjectNotFound):
                client.read_block_type_by_slug(slug)
    env = {"PREFECT_API_URL": prefect_api, "HOTSPARE_REPO": str(REPO), "HOTSPARE_STORE_BLOCK": ""}
    deploy({**os.environ, **env}, "failover", "failback")  # the automations' deployments
    try:
        out = cli("deploy", "--store", str(tmp_path / "store"), env=env).stdout
    finally:
        _drop_automations()
    for slug in slugs:
        assert f"block type {slug} registered" in out
    with get_client(sync_client=True) as client:
        for bt in block_types():
            example = client.read_block_type_by_slug(bt.get_block_type_slug()).code_example
            line = IMPORT.search(example or "")
            assert line, f"{bt.get_block_type_slug()}: no import in its code example {example!r}"
            r = subprocess.run([sys.executable, "-c", line.group(0)], cwd=tmp_path, capture_output=True, text=True)
            assert r.returncode == 0, f"{bt.get_block_type_slug()}: `{line.group(0)}` fails: {r.stderr[-500:]}"


# Prefect's own block checks. Its documentation-URL and logo checks need a published site and
# a logo image (fetched over the network), which hotspare has not: those two are left out.
from prefect.testing.standard_test_suites import BlockStandardTestSuite  # noqa: E402

STANDARD_CHECKS = ("test_has_a_description", "test_all_fields_have_a_description", "test_has_a_valid_code_example")


@pytest.mark.parametrize("check", STANDARD_CHECKS)
@pytest.mark.parametrize("block", block_types(), ids=lambda b: b.__name__)
def test_every_block_passes_prefects_standard_block_checks(block, check: str) -> None:
    getattr(BlockStandardTestSuite, check)(None, block)


def test_blocks_carry_the_engine_models_fields_and_checks() -> None:
    """The policy and EC2 blocks are the engine's models, so a field added there is in the
    block, and a value the engine refuses is refused when the block is made."""
    from hotspare.machine import Policy
    from hotspare.vm.ec2.config import Ec2HostConfig

    assert set(Policy.model_fields) <= set(MachinePolicy.model_fields)
    assert set(Ec2HostConfig.model_fields) <= set(Ec2HostBlock.model_fields)
    with pytest.raises(ValueError, match="not a regular expression"):
        MachinePolicy(drill_pattern="(")
    with pytest.raises(ValueError, match="heartbeat_window"):
        MachinePolicy(heartbeat_window=1)
    cfg = Ec2HostBlock(region="eu-west-1", upload_workers=3, secret_access_key=SecretStr("k")).host().config
    assert (cfg.upload_workers, cfg.secret_access_key.get_secret_value()) == (3, "k")
