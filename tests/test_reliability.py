"""Findings of the reliability issue (#11): each test reproduces one fault first.

Tests of the engine run without Prefect; the CLI ones run the ``hotspare`` command as a
user would. Clock skew is simulated by writing heartbeats and logs with skewed timestamps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hotspare import layout
from hotspare.errors import UsageError
from tests.helpers import cli, random_image

SIZE = 8 << 20


def test_a_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    for bad in ("x\n", "x\r\n", "x\n\n", "\nx"):
        with pytest.raises(UsageError, match="name"):
            layout.check_name("machine", bad)
    assert layout.check_name("machine", "x") == "x"
    image = tmp_path / "disk.img"
    random_image(image, SIZE)
    r = cli("protect", "x\n", "--disk", f"root={image}", "--store", str(tmp_path / "store"), check=False)
    assert r.returncode != 0 and "invalid" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "store" / "machines").exists() or not any((tmp_path / "store" / "machines").iterdir())
