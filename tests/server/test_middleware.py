"""middleware.RateLimiter and TokenFile on their own (a fake clock: no sleeping, no timing)."""

from __future__ import annotations

from pathlib import Path

import pytest
from perennial_server import middleware
from perennial_server.middleware import RateLimiter, TokenFile


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(middleware, "_monotonic", lambda: now[0])
    return now


def test_the_rate_limiter_is_a_token_bucket_per_client(clock) -> None:
    lim = RateLimiter(2.0, burst=3.0, max_clients=2)
    assert [lim.wait("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert lim.wait("a") == pytest.approx(0.5)  # empty: half a second until the next token at 2/s
    assert lim.allow("a") == (False, pytest.approx(0.5))  # a refusal takes nothing
    clock[0] += 0.5
    assert lim.allow("a") == (True, 0.0)
    assert lim.wait("a") == pytest.approx(0.5)
    clock[0] += 100.0  # refilled up to the burst, not beyond
    assert [lim.wait("a") for _ in range(4)][3] == pytest.approx(0.5)
    assert lim.wait("b") == 0.0  # another client has its own bucket
    lim.wait("c")  # a third client: the one seen least recently ("a") is forgotten (starts full again)
    assert [lim.wait("a") for _ in range(3)] == [0.0, 0.0, 0.0]


def test_the_token_file_is_reread_when_it_changes(clock, tmp_path: Path) -> None:
    p = tmp_path / "token"
    p.write_text("one\n")
    tok = TokenFile(str(p), check_interval_s=1.0)
    assert tok.check("Bearer one") and tok.check("bearer  one ") and not tok.check("Bearer two") and not tok.check(None)
    p.write_text("two-longer\n")
    assert tok.check("Bearer one")  # within the interval: not looked at yet
    clock[0] += 1.0
    assert tok.check("Bearer two-longer") and not tok.check("Bearer one") and tok.check_raw("two-longer")
    p.unlink()
    clock[0] += 1.0
    assert not tok.check("Bearer two-longer") and tok.token() is None
    assert not TokenFile("").check("Bearer ") and TokenFile("").token() is None
