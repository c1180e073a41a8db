"""The retry loops' backoff: doubling to a ceiling, jittered, reset by a success, and never
sooner than a server's Retry-After (bounded)."""

from __future__ import annotations

import random

from agent.backoff import Backoff


def no_jitter(low: float, high: float) -> float:
    return low


def test_waits_double_up_to_the_ceiling_and_a_success_starts_again() -> None:
    b = Backoff(0.5, 4.0, spread=(1.0, 1.0), uniform=no_jitter)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next() == 0.5


def test_every_wait_is_jittered_within_the_spread() -> None:
    rng = random.Random(7)
    b = Backoff(1.0, 30.0, uniform=rng.uniform)
    waits = []
    for _ in range(200):
        waits.append(b.next())
        b.reset()
    assert all(0.8 <= w <= 1.2 for w in waits)
    assert len(set(waits)) == len(waits)  # a fleet does not come back in step


def test_a_seeded_rng_gives_the_same_waits() -> None:
    def waits(seed: int) -> list[float]:
        b = Backoff(1.0, 60.0, uniform=random.Random(seed).uniform)
        return [b.next() for _ in range(8)]

    assert waits(3) == waits(3)
    assert waits(3) != waits(4)


def test_retry_after_is_a_floor_spread_upwards() -> None:
    rng = random.Random(1)
    for _ in range(100):
        b = Backoff(0.5, 30.0, uniform=rng.uniform)
        wait = b.next(retry_after=7.0)
        assert 7.0 <= wait <= 7.0 * 1.2


def test_a_short_retry_after_does_not_cut_the_backoff() -> None:
    b = Backoff(0.5, 30.0, spread=(1.0, 1.0), uniform=no_jitter)
    for _ in range(4):
        b.next()
    assert b.next(retry_after=1.0) == 8.0


def test_a_huge_retry_after_is_bounded() -> None:
    b = Backoff(0.5, 30.0, uniform=no_jitter)
    assert b.next(retry_after=86400.0) == 150.0


def test_a_long_outage_stays_at_the_ceiling() -> None:
    b = Backoff(0.5, 30.0, spread=(1.0, 1.0))
    for _ in range(5000):  # days of failures a few seconds apart: no overflow
        wait = b.next()
    assert wait == 30.0


def test_a_huge_retry_after_is_bounded_whatever_the_jitter() -> None:
    """The node writer's README bound, 150 s at most: the spread must not take it past."""
    rng = random.Random(5)
    waits = [Backoff(0.5, 30.0, uniform=rng.uniform).next(retry_after=86400.0) for _ in range(50)]
    assert max(waits) <= 150.0
