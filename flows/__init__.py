"""Prefect flows, one per file: ingest, consolidate, failover, failback."""
