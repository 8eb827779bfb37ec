"""Prefect Blocks that users configure in the UI: the store, machine policies, VM hosts."""

from __future__ import annotations


def block_types() -> tuple:
    """Every block type hotspare defines, in the order ``hotspare deploy`` registers them."""
    from blocks.policy import MachinePolicy
    from blocks.store import HotspareStore
    from blocks.vmhost import BLOCK_TYPES as VM_HOSTS

    return (HotspareStore, MachinePolicy, *VM_HOSTS)


def register_block_types() -> list[str]:
    """Register (idempotently) every hotspare block type with the configured Prefect API, as
    ``prefect block register -m blocks.store`` would; returns their slugs."""
    slugs = []
    for block_type in block_types():
        block_type.register_type_and_schema()
        slugs.append(block_type.get_block_type_slug())
    return slugs
