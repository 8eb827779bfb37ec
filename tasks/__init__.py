"""Prefect tasks: thin wrappers that give engine calls retries, concurrency and logging."""
