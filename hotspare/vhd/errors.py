"""The error hotspare raises for a VHD file that breaks the format."""

from __future__ import annotations

from hotspare.errors import HotspareError


class InvalidVhd(HotspareError):
    """A file that is not a VHD hotspare can trust: bad cookie, stale checksum, a block table
    pointing outside the file, a truncated file, an unsupported disk type.

    The message names the file and the bad value, e.g.
    ``disk.vhd: footer checksum 0x1234abcd, computed 0xffffec13 (stale or corrupted footer)``.
    """

    def __init__(self, name: str, reason: str) -> None:
        self.name = name
        self.reason = reason
        super().__init__(f"{name}: {reason}")
