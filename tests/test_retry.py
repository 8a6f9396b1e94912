"""Retry timing: pure functions of the schedule, the attempt count and a random source."""

from __future__ import annotations

import pytest

from relaygw.retry import JITTER, expired, next_attempt_time, retry_delay

SCHEDULE = (60.0, 300.0, 900.0)


def no_jitter() -> float:
    return 0.5


@pytest.mark.parametrize(("attempts", "delay"), [
    (0, 60.0),   # before any failure: the first step
    (1, 60.0),
    (2, 300.0),
    (3, 900.0),
    (4, 900.0),  # the last step repeats
    (50, 900.0),
], ids=lambda v: str(v))
def test_retry_delay_follows_the_schedule(attempts: int, delay: float) -> None:
    assert retry_delay(SCHEDULE, attempts, no_jitter) == delay


@pytest.mark.parametrize(("random", "factor"), [
    (0.0, 1 - JITTER),
    (0.25, 1 - JITTER / 2),
    (0.5, 1.0),
    (0.75, 1 + JITTER / 2),
    (0.999999, 1 + JITTER),
])
def test_retry_delay_jitter_is_bounded(random: float, factor: float) -> None:
    assert retry_delay(SCHEDULE, 2, lambda: random) == pytest.approx(300.0 * factor)


def test_retry_delay_custom_jitter_never_negative() -> None:
    assert retry_delay(SCHEDULE, 1, lambda: 0.0, jitter=2.0) == 0.0
    assert retry_delay(SCHEDULE, 1, lambda: 0.0, jitter=0.0) == 60.0


def test_retry_delay_single_step_schedule() -> None:
    assert [retry_delay((30.0,), n, no_jitter) for n in range(1, 5)] == [30.0] * 4


@pytest.mark.parametrize(("now", "received", "max_age", "delay", "expected"), [
    (100.0, 0.0, 1000.0, 60.0, 160.0),     # well inside max_age
    (900.0, 0.0, 1000.0, 300.0, 1000.0),   # capped at the expiry time
    (1000.0, 0.0, 1000.0, 60.0, 1000.0),   # already at expiry: now
    (10.0, 5.0, 1000.0, 0.0, 10.0),
])
def test_next_attempt_time(now: float, received: float, max_age: float, delay: float,
                           expected: float) -> None:
    assert next_attempt_time(now, received, max_age, delay) == expected


@pytest.mark.parametrize(("now", "result"), [(999.9, False), (1000.0, True), (1500.0, True)])
def test_expired(now: float, result: bool) -> None:
    assert expired(now, received=0.0, max_age=1000.0) is result
