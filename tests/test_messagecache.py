"""The in-memory copy of small committed messages: bounds, and its life in the spool."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core_fakes import FailingOS, queue_message, recipient, sync_run
from relaygw.envelope import Envelope
from relaygw.messagecache import MessageCache, WireReady, wire_clean
from relaygw.spool import BUFFER_LIMIT, Spool


def test_put_get_and_discard() -> None:
    cache = MessageCache(limit=100)
    cache.put("A", b"hello")
    assert cache.get("A") == b"hello"
    source = cache.open("A")
    assert source is not None and source.read(2) == b"he" and source.read() == b"llo"
    cache.discard("A")
    assert cache.get("A") is None and cache.open("A") is None
    assert cache.size == 0 and len(cache) == 0
    cache.discard("A")  # twice is harmless


def test_the_oldest_go_first_to_stay_under_the_limit() -> None:
    cache = MessageCache(limit=10)
    cache.put("A", b"aaaa")
    cache.put("B", b"bbbb")
    cache.put("C", b"cccc")  # 12 bytes: A goes
    assert [cache.get(k) for k in "ABC"] == [None, b"bbbb", b"cccc"]
    assert cache.size == 8
    cache.put("D", b"x" * 11)  # bigger than the whole cache: not kept, nothing dropped
    assert cache.get("D") is None and cache.size == 8


@given(st.lists(st.tuples(st.sampled_from("ABCDEFG"), st.binary(max_size=40),
                          st.booleans()), max_size=60))
def test_size_is_always_what_is_held_and_never_over_the_limit(
        steps: list[tuple[str, bytes, bool]]) -> None:
    cache = MessageCache(limit=64)
    for key, data, put in steps:
        if put:
            cache.put(key, data)
        else:
            cache.discard(key)
        held = [cache.get(k) for k in "ABCDEFG"]
        assert cache.size == sum(len(m) for m in held if m is not None)
        assert cache.size <= 64
        if put and len(data) <= 64:
            assert cache.get(key) == data  # the newest is always kept


def make_spool(tmp_path: Path, os_module: object | None = None) -> Spool:
    spool = Spool(tmp_path / "spool", sync_run, *([os_module] if os_module else []))
    spool.prepare()
    return spool


def test_a_small_committed_message_is_cached_as_written(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    data = b"Subject: cached\r\n\r\n" + b"x" * 1000 + b"\r\n"
    envelope = queue_message(spool, [recipient("a@dst.test")], data=data)
    assert spool.cache.get(envelope.id) == data
    with open(spool.message_path(envelope.id), "rb") as f:  # the disk says the same
        assert f.read(envelope.size) == data
    with spool.open_message(envelope) as message:
        assert message.read() == data


def test_a_message_that_reached_the_disk_while_received_is_not_cached(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    data = b"x" * (BUFFER_LIMIT + 10)
    envelope = queue_message(spool, [recipient("a@dst.test")], data=data)
    assert spool.cache.get(envelope.id) is None
    with spool.open_message(envelope) as message:  # read from its queue file
        assert message.read() == data


def test_a_failed_commit_caches_nothing(tmp_path: Path) -> None:
    failing = FailingOS(fail_at=3)  # open, write, then the fsync fails
    spool = make_spool(tmp_path, failing)
    incoming = spool.open_incoming()
    incoming.write(b"Subject: lost\r\n\r\nx\r\n")
    failing.armed = True
    envelope = Envelope(id=incoming.id, sender="", recipients=[recipient("a@dst.test")],
                        received=0.0)
    failures: list[object] = []
    spool.commit(incoming, envelope).addErrback(failures.append)
    assert failures
    assert len(spool.cache) == 0


def test_removal_drops_the_cached_copy(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope = queue_message(spool, [recipient("a@dst.test")])
    spool.remove(envelope.id)
    assert spool.cache.get(envelope.id) is None
    assert spool.cache.size == 0


def test_only_what_the_data_reader_vouched_for_opens_wire_ready() -> None:
    cache = MessageCache(limit=100)
    cache.put("A", b"plain\r\n")
    cache.put("B", b"ready\r\n", wire_ready=True)
    assert not isinstance(cache.open("A"), WireReady)
    assert isinstance(cache.open("B"), WireReady)
    cache.discard("B")
    cache.put("B", b"again\r\n")  # the same id, put again without the word
    assert not isinstance(cache.open("B"), WireReady)


def test_an_entry_pushed_out_forgets_it_was_wire_ready() -> None:
    cache = MessageCache(limit=10)
    cache.put("A", b"12345678", wire_ready=True)
    cache.put("B", b"12345678")  # A goes
    assert cache.open("A") is None and cache._wire_ready == set()


@pytest.mark.parametrize(("text", "clean"), [
    (b"Received: from a ([127.0.0.1])\r\n\tby b; date\r\n", True),
    (b"", True),
    (b"a\nb\r\n", False),
    (b"a\rb\r\n", False),
    (b"a\r\n.b\r\n", False),
    (b".a\r\n", False),
    (b"a\r\r\n", False),
])
def test_wire_clean(text: bytes, clean: bool) -> None:
    assert wire_clean(text) is clean
