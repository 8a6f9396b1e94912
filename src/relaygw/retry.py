"""Retry timing as pure functions (no clock, no randomness of its own)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

JITTER = 0.1  # +-10 %: spreads retries of messages that failed together


def retry_delay(schedule: Sequence[float], attempts: int,
                random: Callable[[], float], jitter: float = JITTER) -> float:
    """Delay after the ``attempts``-th failed attempt; the schedule's last step repeats.

    ``random`` returns a float in [0, 1); 0.5 means no jitter (what tests pass).
    """
    base = schedule[min(max(attempts, 1), len(schedule)) - 1]
    return max(0.0, base * (1 + jitter * (2 * random() - 1)))


def next_attempt_time(now: float, received: float, max_age: float, delay: float) -> float:
    """When to try again: never past the expiry time, so expiry is noticed on time."""
    return min(now + delay, received + max_age)


def expired(now: float, received: float, max_age: float) -> bool:
    return now >= received + max_age
