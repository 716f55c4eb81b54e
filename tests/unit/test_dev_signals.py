"""`perennial dev`'s start ends cleanly on a signal even where Python wraps what its handler raises.

Found by CI (test_dev_stop's SIGTERM-banner, about 1 run in 70): the SIGTERM landed while a dataclass was being
defined, CPython 3.11 wrapped the handler's `_Stopped` in a RuntimeError ("Error calling __set_name__"), and the
process ended with a traceback and exit status 1. These run `_dev` in this process with its start replaced, the
signal sent from exactly the place that wraps it, so they do not depend on timing."""

from __future__ import annotations

import argparse
import signal
from typing import Any

import pytest
from perennial import cli


class _SendsSigterm:
    """A descriptor whose `__set_name__` takes a SIGTERM: Python 3.11 wraps what is raised there."""

    def __set_name__(self, owner: type, name: str) -> None:
        signal.raise_signal(signal.SIGTERM)


def _run_dev(monkeypatch: pytest.MonkeyPatch, start: Any, stopped: list[str]) -> int:
    """`cli._dev` with its start replaced: a control plane that 'started' (its stop recorded in `stopped`), then `start`."""

    def fake_start(args: argparse.Namespace, cleanup: list[Any]) -> dict[str, Any]:
        cleanup.append(lambda: stopped.append("control plane"))
        start()
        return {}

    monkeypatch.setattr(cli, "_dev_start", fake_start)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return cli._dev(argparse.Namespace())
    finally:
        after = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig, handler in before.items():
            signal.signal(sig, handler)
        assert after == before, "the previous signal handlers are put back"


def _define_a_class_with_a_descriptor() -> None:
    type("Destinations", (), {"items": _SendsSigterm()})


def _wrap_it_explicitly() -> None:
    try:
        signal.raise_signal(signal.SIGTERM)
    except BaseException as exc:
        raise ValueError("a library turned it into its own error") from exc


@pytest.mark.parametrize("start", [_define_a_class_with_a_descriptor, _wrap_it_explicitly], ids=["set_name", "raise-from"])
def test_a_signal_wrapped_in_another_exception_still_stops_the_start_cleanly(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], start: Any) -> None:
    stopped: list[str] = []
    assert _run_dev(monkeypatch, start, stopped) == 0
    assert stopped == ["control plane"], "what had started is stopped"
    assert "Stopped while starting." in capsys.readouterr().out


def test_an_error_of_its_own_in_the_start_is_not_taken_for_a_stop(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def fails() -> None:
        raise RuntimeError("the control plane could not start")

    stopped: list[str] = []
    with pytest.raises(RuntimeError, match="could not start"):
        _run_dev(monkeypatch, fails, stopped)
    assert stopped == ["control plane"], "what had started is stopped all the same"
    assert "Stopped while starting." not in capsys.readouterr().out
