"""The LangChain example runs offline and tells the whole story."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "langchain_quickstart.py"


def test_the_quickstart_runs_without_keys_or_network(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "closed -> open (threshold)" in out
    assert "role=fallback" in out
    assert "tool call get_weather({'city': 'Oslo'})" in out
    assert "half_open -> closed (probe_succeeded)" in out
    assert "'are you back?' -> 'openai says: are you back?'   [circuit: closed]" in out
