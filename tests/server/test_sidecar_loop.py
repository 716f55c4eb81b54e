"""The sidecar runs on uvloop when it is installed, and can be told not to."""

from __future__ import annotations

import pytest

from perennial_server import sidecar


def test_uvloop_when_installed_unless_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    monkeypatch.delenv("PERENNIAL_SIDECAR_UVLOOP", raising=False)
    assert sidecar.loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("PERENNIAL_SIDECAR_UVLOOP", "0")
    assert sidecar.loop_factory() is None
