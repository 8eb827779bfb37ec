"""hotspare: a running-ready virtual twin for every protected machine.

The engine package. It imports without Prefect: formats (extent log, catalog, VHD), the
object-store layer, the capture agent and the algorithms live here; ``flows/``, ``tasks/``
and ``blocks/`` wrap them for Prefect.

Layers, from the top; a module imports its own layer and those below, never one above
(``tests/test_engine.py`` checks it, and that nothing outside ``hotspare.cli`` imports the
orchestration layer, even inside a function):
- ``cli``: the ``hotspare`` command, the one part that imports ``flows``, ``tasks``,
  ``blocks`` or ``deployments`` (inside its commands);
- the runs, each a loop taking its orchestration steps as arguments: ``ingest``,
  ``failover``, ``failback``, ``drill``, ``fleet``, ``check`` (consolidation's loop,
  ``replica.consolidate``, sits with the data it writes); and the views over everything,
  ``status`` and ``fleetview``;
- the machine's side: ``capture`` (the agent, the storage daemon, cuts), ``vm`` (VM hosts
  and the VM's capture) and ``qmp``;
- the data: ``replica`` (points as chunks), ``consolidate``, ``catalog``, ``extentlog``,
  ``vhd``, ``machine``, ``state``, ``heartbeat``, ``fence``, ``stall``, ``replay``, and the
  failback's records (``failback.orders``, ``failback.model``);
- the base: ``store``, ``layout``, ``versioned``, ``quarantine``, ``errors``,
  ``localfile``, ``unixsocket``, ``faults``, ``progress``, ``demodisk``.
"""

__version__ = "0.1.0"
