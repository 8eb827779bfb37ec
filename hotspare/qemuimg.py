"""Running ``qemu-img``: one place for its missing binary, its timeout and its errors."""

from __future__ import annotations

import shutil
import subprocess

from hotspare.errors import HotspareError


def qemu_img(*args: str, what: str, binary: str = "qemu-img", timeout: float = 120) -> str:
    """Run qemu-img; its stdout, or a HotspareError naming ``what`` and qemu-img's message."""
    exe = shutil.which(binary)
    if exe is None:
        raise HotspareError(f"{what}: {binary} is missing (Debian package qemu-utils)")
    try:
        proc = subprocess.run([exe, *args], stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise HotspareError(f"{what}: qemu-img {args[0]} did not finish in {timeout:.0f} s") from err
    if proc.returncode != 0:
        raise HotspareError(f"{what}: qemu-img {args[0]} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout
