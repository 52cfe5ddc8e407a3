"""The envelope's schema check: fields, defaults, nested and optional types (proto/envelope.py),
with each message class's type hints resolved once, not per message."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import pytest

from ikefarm.proto import envelope
from ikefarm.proto.envelope import BusError, BusMessage
from ikefarm.proto.messages import CertAuthRequest, Datagram, Stats


# plain frozen dataclasses like the registered kinds, kept out of the registry
@dataclass(frozen=True)
class Inner(BusMessage):
    KIND: ClassVar[str] = "test-envelope-inner"
    label: str
    weight: float = 1.0


@dataclass(frozen=True)
class Outer(BusMessage):
    KIND: ClassVar[str] = "test-envelope-outer"
    count: int
    inner: Inner
    maybe: Inner | None = None
    items: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def raw(kind: str, body: object) -> bytes:
    return msgpack.packb({"v": envelope.SCHEMA_VERSION, "kind": kind, "body": body})


def test_round_trips_keep_every_field() -> None:
    outer = Outer(3, Inner("a", 2.5), None, [1, 2], {"k": "v"})
    assert envelope.unpack(envelope.pack(outer), Outer) == outer
    datagram = Datagram("192.0.2.1", 500, "198.51.100.7", 4500, b"\x00" * 28, via="ingress-0")
    assert envelope.unpack(envelope.pack(datagram), Datagram) == datagram
    request = CertAuthRequest(**{**_cert_auth_fields(), "peer_certs": [b"c"]})
    assert envelope.unpack(envelope.pack(request), CertAuthRequest) == request


def _cert_auth_fields() -> dict[str, Any]:
    hints = typing.get_type_hints(CertAuthRequest)
    samples = {str: "x", bytes: b"x", int: 1, bool: False, float: 1.0}
    return {name: samples[hint] for name, hint in hints.items() if hint in samples}


def test_defaults_fill_missing_optional_fields_and_ints_become_floats() -> None:
    outer = envelope.unpack(
        raw("test-envelope-outer", {"count": 1, "inner": {"label": "b"}}), Outer
    )
    assert outer == Outer(1, Inner("b", 1.0))
    inner = envelope.build(Inner, {"label": "c", "weight": 2})
    assert inner.weight == 2.0 and isinstance(inner.weight, float)


@pytest.mark.parametrize(
    "body,code,where",
    [
        ({"inner": {"label": "b"}}, "missing_field", "test-envelope-outer.count"),
        ({"count": "1", "inner": {"label": "b"}}, "bad_field", "Outer.count"),
        ({"count": True, "inner": {"label": "b"}}, "bad_field", "Outer.count"),
        ({"count": 1, "inner": {}}, "missing_field", "test-envelope-inner.label"),
        ({"count": 1, "inner": {"label": "b"}, "maybe": 5}, "bad_field", "Outer.maybe"),
        ({"count": 1, "inner": {"label": "b"}, "items": [1, "x"]}, "bad_field", "Outer.items[]"),
        ({"count": 1, "inner": {"label": "b"}, "extra": []}, "bad_field", "Outer.extra"),
        ([], "bad_field", "test-envelope-outer body"),
    ],
)
def test_bad_bodies_are_refused_with_a_stable_code(body: object, code: str, where: str) -> None:
    with pytest.raises(BusError) as refused:
        envelope.unpack(raw("test-envelope-outer", body), Outer)
    assert refused.value.code == code and where in refused.value.message


def test_type_hints_are_resolved_once_per_message_class(monkeypatch: pytest.MonkeyPatch) -> None:
    resolved: list[type] = []
    real = typing.get_type_hints

    def counting(cls: Any, *args: Any, **kwargs: Any) -> Any:
        resolved.append(cls)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(typing, "get_type_hints", counting)
    monkeypatch.setattr(envelope, "_SCHEMAS", {})
    stats = Stats("ike", "ike-0", "1", 1.0, 2, 0, {})
    packed = envelope.pack(stats)
    for _ in range(50):
        assert envelope.unpack(packed, Stats) == stats
    assert resolved == [Stats]
