"""examples/llamaindex_rag.py runs offline and exits 0, showing the fallback at work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_rag_example_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "llamaindex_rag.py")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.count("(answered by small-model)") == 4
    assert "closed -> open (threshold)" in out
    assert "the primary was called 3 times for 4 queries" in out
    assert "(answered by big-model)  [circuit closed]" in out
    assert "served_by -> 'primary'" in out
