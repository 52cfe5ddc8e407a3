"""The ingress backlog, pure: classes served in order, bounded, drops counted by class."""

from __future__ import annotations

import pytest

from ikefarm.services.ingress.backlog import (
    ESTABLISHED,
    NEW,
    NEW_MAX_WAIT,
    RETURNS_COOKIE,
    Backlog,
    returns_cookie,
)
from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, PayloadType
from ikefarm.shared.ikev2.message import Message, encode_message
from ikefarm.shared.ikev2.payloads import NoncePayload, NotifyPayload


def init(*payloads: object) -> bytes:
    return encode_message(
        Message(ExchangeType.IKE_SA_INIT, b"\x01" * 8, bytes(8), 0, True, False, list(payloads))  # type: ignore[arg-type]
    )


def test_better_classes_first_oldest_first_and_new_inits_newest_first() -> None:
    backlog: Backlog[str] = Backlog(10)
    for name, klass in [
        ("n1", NEW),
        ("c1", RETURNS_COOKIE),
        ("e1", ESTABLISHED),
        ("n2", NEW),
        ("c2", RETURNS_COOKIE),
    ]:
        assert backlog.push(klass, name, now=0.0) is None
    backlog.push(ESTABLISHED, "e2", now=0.0)
    assert [backlog.pop(0.0) for _ in range(7)] == ["e1", "e2", "c1", "c2", "n2", "n1", None]
    assert len(backlog) == 0


def test_a_full_backlog_drops_the_oldest_of_the_worst_class_for_a_better_one() -> None:
    backlog: Backlog[str] = Backlog(3)
    backlog.push(NEW, "n1", 0.0)
    backlog.push(NEW, "n2", 0.0)
    backlog.push(RETURNS_COOKIE, "c1", 0.0)
    assert backlog.push(ESTABLISHED, "e1", 0.0) == NEW  # n1 made room
    assert backlog.push(RETURNS_COOKIE, "c2", 0.0) == NEW  # n2 made room
    assert backlog.push(NEW, "n3", 0.0) == NEW  # the arriving one is the worst
    assert backlog.push(RETURNS_COOKIE, "c3", 0.0) == RETURNS_COOKIE  # no worse class left
    assert backlog.push(ESTABLISHED, "e2", 0.0) == RETURNS_COOKIE  # c1 made room
    assert backlog.dropped == [0, 2, 3]
    assert [backlog.pop(0.0) for _ in range(4)] == ["e1", "e2", "c2", None]
    assert backlog.peak == 3


def test_established_datagrams_are_dropped_only_for_each_other() -> None:
    backlog: Backlog[int] = Backlog(2)
    backlog.push(ESTABLISHED, 1, 0.0)
    backlog.push(ESTABLISHED, 2, 0.0)
    assert backlog.push(ESTABLISHED, 3, 0.0) == ESTABLISHED
    assert backlog.dropped == [1, 0, 0]
    assert [backlog.pop(0.0), backlog.pop(0.0)] == [1, 2]


def test_new_inits_that_waited_too_long_are_dropped() -> None:
    backlog: Backlog[str] = Backlog(10)
    backlog.push(NEW, "old", 0.0)
    backlog.push(NEW, "younger", 0.1)
    backlog.push(ESTABLISHED, "old-established", 0.0)
    backlog.push(NEW, "fresh", NEW_MAX_WAIT)
    later = NEW_MAX_WAIT + 0.05
    assert [backlog.pop(later) for _ in range(4)] == [
        "old-established",  # an SA's datagram is never too old here
        "fresh",
        "younger",
        None,
    ]
    assert backlog.stale == 1 and len(backlog) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Backlog(0)


def test_a_cookie_is_recognised_only_as_the_first_payload() -> None:
    cookie = NotifyPayload(NotifyType.COOKIE, data=b"c" * 16)
    nonce = NoncePayload(b"n" * 32)
    assert returns_cookie(init(cookie, nonce), PayloadType.NOTIFY)
    assert not returns_cookie(init(nonce, cookie), PayloadType.NONCE)
    other = NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, data=b"x" * 20)
    assert not returns_cookie(init(other, nonce), PayloadType.NOTIFY)
    # too short to hold the notify type: not a cookie, and no exception
    assert not returns_cookie(init(cookie)[:33], PayloadType.NOTIFY)
