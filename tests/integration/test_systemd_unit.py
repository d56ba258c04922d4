"""The shipped systemd unit passes `systemd-analyze verify` (systemd does not run here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import require_privileges

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "lazysnap.service"


def test_unit_verifies(tmp_path: Path) -> None:
    require_privileges(binaries=("systemd-analyze",))
    lazysnap = shutil.which("lazysnap", path=str(Path(sys.executable).parent))
    if lazysnap is None:
        pytest.fail("the lazysnap console script is not installed in the venv")
    text = UNIT.read_text()
    assert "Type=notify" in text and "Before=containerd.service" in text
    assert "MemoryMax=" in text and "OOMScoreAdjust=0" in text  # a bound of its own, an ordinary score
    unit = tmp_path / "lazysnap.service"  # same unit, ExecStart pointing at this checkout's venv
    unit.write_text(text.replace("/opt/lazysnap/venv/bin/lazysnap", lazysnap))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "lazysnap.service" in line]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr
