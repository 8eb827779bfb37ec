"""Every block hotspare registers: saves to and loads from a real Prefect API, and never
shows a secret."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from blocks.policy import MachinePolicy
from blocks.store import HotspareStore

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.mark.parametrize("block", [
    HotspareStore(url="s3://bucket/prefix", endpoint_url="http://127.0.0.1:9", region="us-east-1",
                  access_key_id="AKIDEXAMPLE", secret_access_key=SecretStr("very-secret-value")),
    MachinePolicy(heartbeat_window=30, auto_approve=True, retention_points=5),
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
