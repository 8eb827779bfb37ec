"""Failback: bring a returning machine's disk to the replica's state while the VM serves.

The flow and the machine talk only through the store, as for capture: the flow commits
*orders* (``orders.py``), the restoring agent carries them out (``restore.py``) and reports
in its heartbeat. ``plan.py`` holds the flow's side: which byte ranges to move, the data
logs that carry the replica's content for them, and the replica's block hashes that the
machine's disk is verified against.
"""
