"""hotspare: a running-ready virtual twin for every protected machine.

The engine package. It imports without Prefect: formats (extent log, catalog, VHD), the
object-store layer, the capture agent and the algorithms live here; ``flows/``, ``tasks/``
and ``blocks/`` wrap them for Prefect.
"""

__version__ = "0.1.0"
