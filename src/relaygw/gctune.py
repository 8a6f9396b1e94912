"""The cyclic garbage collector, set for a server that makes short-lived cycles.

CPython runs a young-generation collection every 700 net container
allocations. Objects caught in reference cycles (a coroutine and the
Deferreds it waits on, a protocol and its timers) are only freed by such a
collection, so they count as net allocations: a relayed message leaves about
five, and the default threshold meant a collection every 140 messages or so.
End to end at 10 sessions, 20,000 messages cost 135 ms of collections (about
1 % of the reactor thread); with the threshold at 20,000 the same run spent
16 ms, and holds at most that many dead containers (a few MiB) between
collections. Everything made while starting (modules, the configuration,
routing tables, the services) lives as long as the process: ``gc.freeze``
moves it out of the collector's sight, so the rare full collections do not
walk it again. The price: what is frozen and later becomes cyclic garbage
(the start-up configuration, once a SIGHUP replaces it) is never collected,
a bounded one-time cost.

Only ``twistd relaygw`` calls ``tune`` (``relaygw.tap``); tests and an
embedding program keep their interpreter's settings.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def tune() -> None:
    """Freeze what exists now and raise the young generation's threshold."""
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
