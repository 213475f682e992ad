"""The sync modules generated from their asyncio sources are up to date (CI fails if not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "async_to_sync.py"


def test_every_generated_module_matches_its_async_source() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_generated_module_says_so_in_its_first_lines() -> None:
    for name in ("cluster", "connection"):
        head = (ROOT / "src" / "replica_router" / f"{name}.py").read_text().splitlines()[:2]
        assert f"Generated from replica_router/{name}_async.py" in head[0]
        assert "do not edit" in head[0]
