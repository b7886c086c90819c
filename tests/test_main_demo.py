"""The README's first command runs examples/quickstart.py: it must show the whole outage."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_main_demo_shows_the_circuit_open_the_fallback_serve_and_the_circuit_close() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "closed -> open (threshold)" in out
    assert "primary calls while open: 0" in out
    assert "open -> half_open (cooldown_elapsed)" in out
    assert "half_open -> closed (probe_succeeded)" in out
    assert out.count("(fallback) I am the backup model.") == 6
    # It says its clock is simulated, so nobody waits for (or wonders about) the 30 s.
    assert "simulated clock" in out
    assert "30 s later on the simulated clock (no waiting)" in out
    # The table at the end: the primary's circuit closed again, 6 calls sent to the
    # fallback; the fallback's own row is explained under it.
    rows = {line.split()[0]: line.split() for line in out.splitlines() if "::" in line}
    primary = rows["flakychatmodel::gpt-4o-mini"]
    assert primary[1] == "closed"
    assert primary[-1] == "6"
    assert "A fallback model has a circuit of its own" in out
