"""``python -m hotspare.cli``: the ``hotspare`` command."""

from hotspare.cli import main

main()
