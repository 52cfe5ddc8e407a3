"""MOBIKE (RFC 4555) between two engines: negotiation, the float to 4500, UPDATE_SA_ADDRESSES
both ways, NAT detection on the new path, COOKIE2, and the refusals (UNACCEPTABLE_ADDRESSES,
UNEXPECTED_NAT_DETECTED, INVALID_SYNTAX for malformed notifies) that change nothing."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import ClassVar

import pytest

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType
from ikefarm.shared.ikev2.effects import Effect, Endpoint, SaEvent, SendDatagram, UpdateChildSa
from ikefarm.shared.ikev2.engine import IkeEngine
from ikefarm.shared.ikev2.exchanges import mobike
from ikefarm.shared.ikev2.exchanges.natd import natd_notifies
from ikefarm.shared.ikev2.exchanges.task import Task
from ikefarm.shared.ikev2.message import Message, decrypt_message, parse_message
from ikefarm.shared.ikev2.payloads import NotifyPayload, Payload
from ikefarm.shared.ikev2.sa import IkeSa
from tests.engine_helpers import Nat, Wire, pair

MOBIKE_VPN = "ike-policy = { mobike = true }"
NEW_ADDRESS = "192.0.2.22"


def established(responder_mobike: bool = True, initiator_mobike: bool = True) -> Wire:
    wire = pair(
        responder_vpn=MOBIKE_VPN if responder_mobike else "",
        initiator_vpn=MOBIKE_VPN if initiator_mobike else "",
    )
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    return wire


def only_sa(engine: IkeEngine) -> IkeSa:
    (sa,) = engine.sas.values()
    return sa


@dataclass(repr=False)
class RawRequest(Task):
    """Sends the INFORMATIONAL payloads it is given and keeps the response."""

    name: ClassVar[str] = "raw"
    exchange: ClassVar[ExchangeType] = ExchangeType.INFORMATIONAL
    payloads: list[Payload]
    response: Message | None = None

    def build(self, engine: IkeEngine, sa: IkeSa, now: float) -> list[Effect]:
        return engine.send_request(sa, ExchangeType.INFORMATIONAL, self.payloads, now, self)

    def process(self, engine: IkeEngine, sa: IkeSa, response: Message, now: float) -> list[Effect]:
        self.response = response
        return engine.request_done(sa, now)


def send_raw(wire: Wire, payloads: list[Payload], *, local: Endpoint | None = None) -> Message:
    """The initiator sends an INFORMATIONAL with `payloads` (from `local` if given)."""
    engine = wire.initiator.engine
    sa = only_sa(engine)
    if local is not None:
        sa.local = local
    task = RawRequest(payloads)
    wire.run(engine.queue_task(sa, task, wire.now), wire.initiator)
    assert task.response is not None
    return task.response


def notify_types(message: Message) -> list[int]:
    return [int(n.notify_type) for n in message.notifies()]


def test_mobike_is_negotiated_and_the_initiator_floats_to_4500_without_a_nat() -> None:
    wire = established()
    i_sa, r_sa = only_sa(wire.initiator.engine), only_sa(wire.responder.engine)
    assert mobike.in_use(i_sa) and mobike.in_use(r_sa)
    # RFC 4555 3.2: IKE on the NAT-T port from IKE_AUTH on, ESP not encapsulated (no NAT)
    assert i_sa.local == Endpoint("192.0.2.2", 4500) and i_sa.remote.port == 4500
    assert r_sa.remote == Endpoint("192.0.2.2", 4500) and r_sa.local.port == 4500
    assert not r_sa.nat_detected and not r_sa.children[0].udp_encap


@pytest.mark.parametrize(("responder", "initiator"), [(False, True), (True, False)])
def test_mobike_needs_both_sides(responder: bool, initiator: bool) -> None:
    wire = established(responder, initiator)
    assert not mobike.in_use(only_sa(wire.initiator.engine))
    assert not mobike.in_use(only_sa(wire.responder.engine))


def test_update_sa_addresses_moves_the_ike_sa_and_its_children_with_the_same_spis() -> None:
    wire = established()
    initiator, responder = wire.initiator.engine, wire.responder.engine
    i_sa, r_sa = only_sa(initiator), only_sa(responder)
    child = r_sa.children[0]
    spis = (r_sa.spi_i, r_sa.spi_r, child.spi_in, child.spi_out)
    wire.responder.effects.clear()

    effects = initiator.move_local(i_sa, NEW_ADDRESS, wire.now)
    wire.initiator.address = NEW_ADDRESS  # the wire delivers to the initiator's new address
    wire.run(effects, wire.initiator)

    assert r_sa.remote == Endpoint(NEW_ADDRESS, 4500)
    assert (r_sa.spi_i, r_sa.spi_r, child.spi_in, child.spi_out) == spis
    assert r_sa.children == [child]
    (update,) = [e for e in wire.responder.effects if isinstance(e, UpdateChildSa)]
    assert (update.spi_in, update.spi_out) == (child.spi_in, child.spi_out)
    assert update.remote == Endpoint(NEW_ADDRESS, 4500) and update.udp_encap is False
    (moved,) = [e for e in wire.responder.effects if isinstance(e, SaEvent)]
    assert moved.kind == "ike-moved" and moved.detail["remote"] == f"{NEW_ADDRESS}[4500]"
    # the response went to the new address; our COOKIE2 came back (RFC 4555 3.7)
    assert initiator.counters["mobike.update_confirmed"] == 1
    assert i_sa.outstanding is None and i_sa.local == Endpoint(NEW_ADDRESS, 4500)
    assert responder.counters["mobike.moved_by_peer"] == 1
    # the SA keeps working on the new path
    wire.run(initiator.rekey_child(i_sa, i_sa.children[0], wire.now), wire.initiator)
    assert r_sa.children[0].spi_in != child.spi_in
    assert responder.counters["dropped.integrity_check_failed"] == 0


def test_a_nat_on_the_new_path_turns_udp_encapsulation_on() -> None:
    wire = established()
    initiator, responder = wire.initiator.engine, wire.responder.engine
    i_sa, r_sa = only_sa(initiator), only_sa(responder)
    wire.nat = Nat("198.51.100.7")
    wire.responder.effects.clear()
    effects = initiator.move_local(i_sa, "192.0.2.2", wire.now)  # same address, now NATed
    wire.run(effects, wire.initiator)
    assert r_sa.remote.address == "198.51.100.7" and r_sa.nat_remote
    (update,) = [e for e in wire.responder.effects if isinstance(e, UpdateChildSa)]
    assert update.udp_encap is True and r_sa.children[0].udp_encap
    # the initiator learns its NAT from the response's NAT_DETECTION_* and encapsulates too
    assert i_sa.nat_local and i_sa.children[0].udp_encap


def test_a_request_from_another_path_is_answered_there_without_moving_the_sa() -> None:
    wire = established()
    r_sa = only_sa(wire.responder.engine)
    wire.responder.effects.clear()
    response = send_raw(wire, [], local=Endpoint("192.0.2.2", 4600))
    assert response.payloads == []
    sends = [e for e in wire.responder.effects if isinstance(e, SendDatagram)]
    assert [s.remote for s in sends] == [Endpoint("192.0.2.2", 4600)]
    assert r_sa.remote == Endpoint("192.0.2.2", 4500)  # RFC 4555 3.5: only an update moves it


def test_without_mobike_a_request_from_another_port_still_moves_the_sa() -> None:
    wire = established(responder_mobike=False, initiator_mobike=False)
    r_sa = only_sa(wire.responder.engine)
    send_raw(wire, [], local=Endpoint("192.0.2.2", 4600))
    assert r_sa.remote == Endpoint("192.0.2.2", 4600)  # RFC 7296 2.23 as before


def test_path_check_with_nat_detection_is_answered_with_ours() -> None:
    wire = established()
    i_sa = only_sa(wire.initiator.engine)
    local = Endpoint("192.0.2.2", 4500)
    response = send_raw(wire, natd_notifies(i_sa.spi_i, i_sa.spi_r, local, i_sa.remote))
    assert NotifyType.NAT_DETECTION_SOURCE_IP in notify_types(response)
    assert NotifyType.NAT_DETECTION_DESTINATION_IP in notify_types(response)


def test_additional_addresses_are_kept_and_replaced() -> None:
    wire = established()
    r_sa = only_sa(wire.responder.engine)
    send_raw(
        wire,
        [
            NotifyPayload(NotifyType.ADDITIONAL_IP4_ADDRESS, data=bytes([198, 51, 100, 9])),
            NotifyPayload(
                NotifyType.ADDITIONAL_IP6_ADDRESS,
                data=ipaddress.ip_address("2001:db8::9").packed,
            ),
        ],
    )
    assert r_sa.peer_addresses == ("198.51.100.9", "2001:db8::9")
    send_raw(wire, [NotifyPayload(NotifyType.NO_ADDITIONAL_ADDRESSES)])
    assert r_sa.peer_addresses == ()


def update_payloads(sa: IkeSa, local: Endpoint, *extra: Payload) -> list[Payload]:
    return [
        NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES),
        NotifyPayload(NotifyType.COOKIE2, data=b"c" * 16),
        *natd_notifies(sa.spi_i, sa.spi_r, local, sa.remote),
        *extra,
    ]


def test_cookie2_is_echoed() -> None:
    wire = established()
    i_sa = only_sa(wire.initiator.engine)
    response = send_raw(wire, update_payloads(i_sa, i_sa.local))
    cookie = response.notify(NotifyType.COOKIE2)
    assert cookie is not None and cookie.data == b"c" * 16


def test_no_nats_allowed_that_does_not_match_is_refused() -> None:
    wire = established()
    i_sa, r_sa = only_sa(wire.initiator.engine), only_sa(wire.responder.engine)
    before = (r_sa.local, r_sa.remote)
    new_local = Endpoint(NEW_ADDRESS, 4500)
    # the initiator claims it sent from another address than the one the responder sees
    claimed = (
        ipaddress.ip_address("192.0.2.99").packed
        + ipaddress.ip_address("192.0.2.1").packed
        + (4500).to_bytes(2, "big") * 2
    )
    wire.initiator.address = NEW_ADDRESS
    payloads = update_payloads(
        i_sa, new_local, NotifyPayload(NotifyType.NO_NATS_ALLOWED, data=claimed)
    )
    response = send_raw(wire, payloads, local=new_local)
    assert notify_types(response) == [NotifyType.UNEXPECTED_NAT_DETECTED]
    assert (r_sa.local, r_sa.remote) == before
    assert wire.responder.engine.counters["mobike.refused.unexpected_nat_detected"] == 1


def test_no_nats_allowed_that_matches_is_accepted() -> None:
    wire = established()
    i_sa, r_sa = only_sa(wire.initiator.engine), only_sa(wire.responder.engine)
    new_local = Endpoint(NEW_ADDRESS, 4500)
    data = (
        ipaddress.ip_address(NEW_ADDRESS).packed
        + ipaddress.ip_address("192.0.2.1").packed
        + (4500).to_bytes(2, "big") * 2
    )
    wire.initiator.address = NEW_ADDRESS
    no_nats = NotifyPayload(NotifyType.NO_NATS_ALLOWED, data=data)
    payloads = update_payloads(i_sa, new_local, no_nats)
    send_raw(wire, payloads, local=new_local)
    assert r_sa.remote == new_local


def test_an_address_of_the_other_family_is_unacceptable() -> None:
    wire = established()
    i_sa, r_sa = only_sa(wire.initiator.engine), only_sa(wire.responder.engine)
    before = (r_sa.local, r_sa.remote)
    engine = wire.responder.engine
    # deliver the update by hand as if it came over IPv6
    i_sa.local = Endpoint("2001:db8::2", 4500)
    task = RawRequest(update_payloads(i_sa, i_sa.local))
    effects = wire.initiator.engine.queue_task(i_sa, task, wire.now)
    (send,) = [e for e in effects if isinstance(e, SendDatagram)]
    out = engine.receive(send.data, Endpoint("2001:db8::1", 4500), send.local, wire.now)
    (answer,) = [e for e in out if isinstance(e, SendDatagram)]
    assert answer.remote == Endpoint("2001:db8::2", 4500)  # answered where it came from
    parsed = parse_message(answer.data)
    assert r_sa.keys is not None and r_sa.protection is not None
    message = decrypt_message(parsed, r_sa.protection, *r_sa.keys.inbound(True))
    assert notify_types(message) == [NotifyType.UNACCEPTABLE_ADDRESSES]
    assert (r_sa.local, r_sa.remote) == before


MALFORMED = [
    (NotifyPayload(NotifyType.COOKIE2, data=b"short"), "cookie2_length"),
    (NotifyPayload(NotifyType.COOKIE2, data=b"x" * 65), "cookie2_length"),
    (
        NotifyPayload(NotifyType.ADDITIONAL_IP4_ADDRESS, data=b"\x01\x02\x03"),
        "additional_address_length",
    ),
    (
        NotifyPayload(NotifyType.ADDITIONAL_IP6_ADDRESS, data=b"\x01" * 4),
        "additional_address_length",
    ),
    (NotifyPayload(NotifyType.NO_NATS_ALLOWED, data=b"\x00" * 13), "no_nats_allowed_length"),
    (NotifyPayload(NotifyType.NAT_DETECTION_SOURCE_IP, data=b"\x00" * 19), "natd_length"),
]


@pytest.mark.parametrize(("bad", "reason"), MALFORMED, ids=[r for _b, r in MALFORMED])
def test_malformed_mobike_notifies_are_refused_with_invalid_syntax(
    bad: NotifyPayload, reason: str
) -> None:
    wire = established()
    r_sa = only_sa(wire.responder.engine)
    before = (r_sa.local, r_sa.remote, r_sa.peer_addresses, r_sa.nat_local, r_sa.nat_remote)
    new_local = Endpoint(NEW_ADDRESS, 4500)
    wire.initiator.address = NEW_ADDRESS
    payloads = [NotifyPayload(NotifyType.UPDATE_SA_ADDRESSES), bad]
    response = send_raw(wire, payloads, local=new_local)
    assert notify_types(response) == [NotifyType.INVALID_SYNTAX]
    assert (r_sa.local, r_sa.remote, r_sa.peer_addresses, r_sa.nat_local, r_sa.nat_remote) == (
        before
    )
    assert wire.responder.engine.counters[f"dropped.mobike_{reason}"] == 1


def test_mobike_notifies_without_mobike_change_nothing() -> None:
    wire = established(responder_mobike=False)
    i_sa, r_sa = only_sa(wire.initiator.engine), only_sa(wire.responder.engine)
    before = r_sa.remote
    response = send_raw(wire, update_payloads(i_sa, i_sa.local))
    assert response.payloads == []
    assert r_sa.remote == before
    assert wire.responder.engine.counters["mobike.not_negotiated"] == 1


def test_a_response_without_our_cookie2_deletes_the_sa() -> None:
    wire = established()
    initiator = wire.initiator.engine
    i_sa = only_sa(initiator)
    task = mobike.UpdateAddressesTask(cookie2=b"x" * 16)
    i_sa.outstanding = None
    forged = Message(
        exchange_type=ExchangeType.INFORMATIONAL,
        spi_i=i_sa.spi_i,
        spi_r=i_sa.spi_r,
        message_id=0,
        is_initiator=False,
        is_response=True,
        payloads=[NotifyPayload(NotifyType.COOKIE2, data=b"y" * 16)],
        protected=True,
    )
    effects = task.process(initiator, i_sa, forged, wire.now)
    assert initiator.counters["mobike.cookie2_mismatch"] == 1
    assert i_sa.delete_reason == "cookie2 mismatch"
    assert any(isinstance(e, SendDatagram) for e in effects)  # the Delete goes out


def test_peer_addresses_survive_a_snapshot() -> None:
    wire = established()
    r_sa = only_sa(wire.responder.engine)
    r_sa.peer_addresses = ("198.51.100.9",)
    snapshot, secrets = wire.responder.engine.snapshot(r_sa, wire.now)
    again = type(snapshot).from_json(snapshot.to_json())
    other = pair(responder_vpn=MOBIKE_VPN).responder.engine
    restored = other.restore(again, secrets, wire.now)
    assert restored.peer_addresses == ("198.51.100.9",)
    assert mobike.in_use(restored)
