"""Prefect Blocks that users configure in the UI: the store, machine policies, VM hosts."""
