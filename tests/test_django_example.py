"""examples/django_app: post, follow the redirect, see the post -- from the primary
while the replicas have not replayed it, from a replica once one has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "django_app" / "demo.py"


@pytest.mark.slow
def test_the_example_shows_the_post_from_the_primary_then_from_a_replica() -> None:
    result = subprocess.run(
        [sys.executable, str(DEMO)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-4000:]
    paused, resumed = result.stdout.splitlines()
    assert paused == "replicas paused : 'Hello, replicas' in html=True, served by default"
    assert resumed.startswith("replicas resumed: 'Hello, replicas' in html=True, served by replica")
