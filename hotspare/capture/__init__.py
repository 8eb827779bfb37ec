"""Capture: the agent that turns a protected disk's changes into extent logs.

Terms:
- block: a fixed-size piece of the disk (default 64 KiB) that the scan tracker hashes.
- hash map: the xxh3-64 of every block as last shipped; a block whose hash differs has
  changed. It is persisted on the machine only after the logs carrying the change are
  durable in the store, so a crash in between re-ships and never loses a write.
- cycle: one pass of the agent over every disk, ending with a heartbeat.
"""
