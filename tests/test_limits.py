"""Connection admission limits in isolation, on an injected monotonic clock."""

from __future__ import annotations

from conftest import FakeMonotonic

from quotaserver.realtime.limits import MAX_TRACKED_ADDRESSES, ConnectionLimiter


def test_attempts_slide_out_of_the_window_and_a_refusal_is_not_counted():
    clock = FakeMonotonic()
    limiter = ConnectionLimiter(attempts_per_ip=2, window=10.0, clock=clock)
    assert limiter.attempt("a") is None
    clock.advance(4)
    assert limiter.attempt("a") is None
    assert limiter.attempt("a") == 6  # the first attempt leaves the window in 6 s
    assert limiter.attempt("b") is None  # per address
    clock.advance(5.5)
    assert limiter.attempt("a") == 1  # 0.5 s left: rounded up, never 0
    clock.advance(0.5)
    assert limiter.attempt("a") is None  # the refusals above did not use up the window


def test_a_spray_of_addresses_is_forgotten_once_idle():
    clock = FakeMonotonic()
    limiter = ConnectionLimiter(attempts_per_ip=5, window=10.0, clock=clock)
    for n in range(MAX_TRACKED_ADDRESSES):
        limiter.attempt(f"10.0.{n // 256}.{n % 256}")
    clock.advance(10)
    assert limiter.attempt("192.0.2.1") is None  # one over the bound: the idle ones go
    assert list(limiter._attempts) == ["192.0.2.1"]


def test_live_connections_per_identity():
    limiter = ConnectionLimiter(per_identity=2)
    assert limiter.identity_refusal(1) is None
    assert limiter.identity_refusal(2) == "at most 2 live connections per identity"
