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


def destination_backoff(schedule: Sequence[float], failures: int,
                        random: Callable[[], float], jitter: float = JITTER) -> float:
    """How long a destination that failed ``failures`` times in a row stays dead.

    Starts at the schedule's first step and doubles per consecutive failure, up
    to its last step, so a hop that is down for long is probed rarely while a
    short outage costs little. Jittered once per mark (every message parked
    behind it comes back at the same moment).
    """
    first, cap = schedule[0], max(schedule[-1], schedule[0])
    doublings = min(max(failures, 1) - 1, 64)  # 2**64 * any step is past any cap
    base = min(first * 2 ** doublings, cap)
    return max(0.0, base * (1 + jitter * (2 * random() - 1)))
