"""A minimal PNG encoder (8-bit RGB, zlib) for screenshots QEMU can only save as PPM.

References: the PNG specification (W3C, 2nd edition), chunks IHDR, IDAT, IEND; Netpbm's
P6 (binary PPM) format, as QEMU's screendump writes it.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

from hotspare.errors import HotspareError

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(width: int, height: int, rgb: bytes | memoryview) -> bytes:
    """PNG bytes of an 8-bit RGB image given as ``height`` rows of ``width * 3`` bytes."""
    stride = width * 3
    if width <= 0 or height <= 0 or len(rgb) != stride * height:
        raise ValueError(f"{width}x{height} RGB needs {stride * height} bytes, got {len(rgb)}")
    view = memoryview(rgb)
    # Filter type 0 (none) before each row: screens compress well enough without filters.
    raw = b"".join(b"\0" + view[y * stride:(y + 1) * stride] for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # depth 8, colour type 2 (RGB)
    return SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


def read_ppm(path: str | os.PathLike[str]) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (P6, maxval 255)."""
    data = Path(path).read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' comments may come between
        while pos < len(data) and data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.find(b"\n", pos) + 1 or len(data)
            continue
        end = pos
        while end < len(data) and not data[end:end + 1].isspace():
            end += 1
        if end == pos:
            raise HotspareError(f"{path}: truncated PPM header")
        fields.append(data[pos:end])
        pos = end
    pos += 1  # the single whitespace byte after maxval
    if fields[0] != b"P6" or fields[3] != b"255":
        raise HotspareError(f"{path}: not an 8-bit binary PPM (magic {fields[0]!r}, maxval {fields[3]!r})")
    width, height = int(fields[1]), int(fields[2])
    pixels = data[pos:pos + width * height * 3]
    if len(pixels) != width * height * 3:
        raise HotspareError(f"{path}: PPM holds {len(pixels)} pixel bytes, {width}x{height} needs {width * height * 3}")
    return width, height, pixels


def ppm_to_png(ppm: str | os.PathLike[str], png: str | os.PathLike[str]) -> tuple[int, int]:
    """Convert a P6 PPM file to PNG; returns (width, height)."""
    width, height, pixels = read_ppm(ppm)
    Path(png).write_bytes(encode_png(width, height, pixels))
    return width, height


def png_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR, after checking the signature and the IHDR's CRC."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 33 or head[:8] != SIGNATURE or head[12:16] != b"IHDR":
        raise HotspareError(f"{path}: not a PNG file (bad signature or no IHDR first)")
    (length,) = struct.unpack(">I", head[8:12])
    (crc,) = struct.unpack(">I", head[29:33])
    if length != 13 or zlib.crc32(head[12:29]) != crc:
        raise HotspareError(f"{path}: PNG IHDR chunk is corrupt")
    width, height = struct.unpack(">II", head[16:24])
    return width, height
