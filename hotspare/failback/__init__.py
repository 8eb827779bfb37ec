"""Failback: bring a returning machine's disk to the replica's state while the VM serves.

The flow and the machine talk only through the store, as for capture: the flow commits
*orders* (``orders.py``), the restoring agent carries them out (``restore.py``) and reports
in its heartbeat. ``controller.py`` runs a failback's phases over the machine's state chain
(``model.py``: the phase and the progress it records), taking its orchestration as steps.
``plan.py`` and ``content.py`` hold its side of the work: which byte ranges to move, the
data logs that carry the replica's content for them, and the replica's block hashes that
the machine's disk is verified against; ``publish.py`` commits the orders and reads the
agent's progress.
"""
