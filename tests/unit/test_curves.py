"""The curve plot helper process: draws the PNG, never fails a run."""

from __future__ import annotations

import logging

from perennial_trainer.curves import CurvePlotter

HISTORY = [{"step": i, "loss": 1.0 / i, "reward": i / 10} for i in range(1, 11)]


def test_helper_draws_the_png_it_was_started_for(tmp_path):
    out = tmp_path / "curves.png"
    p = CurvePlotter(str(out))
    assert p.proc is not None
    p.send(HISTORY)
    p.wait()
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp.png"))


def test_nothing_to_draw_writes_nothing(tmp_path):
    out = tmp_path / "curves.png"
    p = CurvePlotter(str(out))
    p.send([{"step": 1}])
    p.wait()
    assert not out.exists()


def test_a_failed_plot_is_a_warning(tmp_path, caplog):
    out = tmp_path / "missing-dir" / "curves.png"  # cannot be written
    p = CurvePlotter(str(out))
    with caplog.at_level(logging.WARNING, logger="perennial_trainer"):
        p.send(HISTORY)
        p.wait()
    assert not out.exists()
    assert "cannot plot curves" in caplog.text


def test_cancel_kills_an_unused_helper(tmp_path):
    p = CurvePlotter(str(tmp_path / "curves.png"))
    p.cancel()
    assert p.proc.returncode is not None
