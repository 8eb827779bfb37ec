"""hotspare: a running-ready virtual twin for every protected machine.

The engine package. It imports without Prefect: formats (extent log, catalog, VHD), the
object-store layer, the capture agent and the algorithms live here; ``flows/``, ``tasks/``
and ``blocks/`` wrap them for Prefect.

Layers, each calling only those below it:
- ``hotspare.cli``: the ``hotspare`` command, the one part of the package that imports
  ``flows``, ``tasks``, ``blocks`` or ``deployments`` (inside its commands);
- the orchestration pieces: ``failover``, ``failback``, ``drill``, ``fleet``, ``ingest``,
  each a loop that takes its orchestration steps as arguments;
- the machine's side: ``capture`` (the agent, the storage daemon, cuts) and ``vm`` (VM hosts
  and the VM's capture);
- the data: ``replica`` (points as chunks), ``consolidate``, ``catalog``, ``extentlog``,
  ``vhd``, ``state``, ``machine``, ``heartbeat``;
- ``store`` (one object-store interface) and ``errors``, which everything uses.
Nothing in ``hotspare`` imports the orchestration layer, not even inside a function
(``tests/test_engine.py`` reads every module to check it).
"""

__version__ = "0.1.0"
