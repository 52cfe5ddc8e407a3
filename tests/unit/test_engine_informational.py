"""INFORMATIONAL both ways (RFC 7296 1.4, 1.5, 3.10.1): deletes, liveness, notifies, in memory."""

from __future__ import annotations

from ikefarm.shared.ikev2.constants import ExchangeType, NotifyType, ProtocolId
from ikefarm.shared.ikev2.effects import DeleteChildSa, Endpoint, Log, SaEvent, SendDatagram
from ikefarm.shared.ikev2.exchanges import informational
from ikefarm.shared.ikev2.message import Message, decrypt_message, encode_message, parse_message
from ikefarm.shared.ikev2.payloads import DeletePayload, NotifyPayload
from ikefarm.shared.ikev2.policy import RetransmitPolicy
from ikefarm.shared.ikev2.retransmit import total_timeout
from ikefarm.shared.ikev2.sa import ChildSaState, IkeSaState
from tests.engine_helpers import Wire, pair

FAST = RetransmitPolicy(tries=2, timeout=1.0, base=2.0, jitter=0, limit=0)


def established(wire: Wire):  # type: ignore[no-untyped-def]
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (i_sa,) = wire.initiator.engine.sas.values()
    (r_sa,) = wire.responder.engine.sas.values()
    return i_sa, r_sa


def fast(wire: Wire) -> None:
    for side in (wire.initiator, wire.responder):
        policy = side.engine.policy
        side.engine.policy = type(policy)(**{**policy.__dict__, "retransmit": FAST})


def events(effects: list, kind: str) -> list[SaEvent]:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, SaEvent) and e.kind == kind]


def logs(effects: list, event: str) -> list[Log]:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, Log) and e.event == event]


def test_initiator_deletes_a_child_and_both_sides_uninstall_it() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = i_sa.children
    (peer_child,) = r_sa.children
    effects = wire.initiator.engine.delete_child(i_sa, child, wire.now)
    (closing,) = logs(effects, "closing_child_sa")
    assert closing.level == 0
    assert closing.fields["line"] == (
        f"closing CHILD_SA net{{{child.unique_id}}} with SPIs {child.spi_in.hex()}_i (0 bytes) "
        f"{child.spi_out.hex()}_o (0 bytes) and TS 10.200.0.0/24 === 10.100.0.0/24"
    )
    wire.run(effects, wire.initiator)
    assert i_sa.children == [] and r_sa.children == []
    assert i_sa.state == r_sa.state == IkeSaState.ESTABLISHED
    for side, gone in ((wire.initiator, child), (wire.responder, peer_child)):
        (delete,) = [e for e in side.effects if isinstance(e, DeleteChildSa)]
        assert (delete.spi_in, delete.spi_out) == (gone.spi_in, gone.spi_out)
        (event,) = events(side.effects, "child-deleted")
        assert event.detail["unique_id"] == gone.unique_id
        assert [e.level for e in logs(side.effects, "child_sa_deleted")] == [0]
    # the request names our inbound SPI, the response the peer's (RFC 7296 1.4.1)
    (_, request), (_, response) = wire.log[-2:]
    for data, sa, spi in ((request, r_sa, child.spi_in), (response, i_sa, peer_child.spi_in)):
        message = decrypt_message(parse_message(data), sa.protection, *sa.inbound_keys())
        assert message.exchange_type == ExchangeType.INFORMATIONAL
        (delete,) = message.get_all(DeletePayload)
        assert (delete.protocol_id, delete.spis) == (ProtocolId.ESP, [spi])
    assert wire.initiator.engine.counters["child_sa_deleted_by_us"] == 1
    assert wire.responder.engine.counters["child_sa_deleted_by_peer"] == 1


def test_the_responder_side_can_delete_too() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (peer_child,) = r_sa.children
    wire.run(wire.responder.engine.delete_child(r_sa, peer_child, wire.now), wire.responder)
    assert i_sa.children == [] and r_sa.children == []
    wire.run(wire.responder.engine.delete_ike(r_sa, wire.now, "flushed"), wire.responder)
    assert wire.initiator.engine.sas == {} and wire.responder.engine.sas == {}
    (event,) = events(wire.responder.effects, "ike-deleted")
    assert event.detail["reason"] == "flushed"
    (line,) = logs(wire.responder.effects, "deleting_ike_sa")
    assert line.fields["line"] == (
        f"deleting IKE_SA rw[{r_sa.unique_id}] between "
        "192.0.2.1[gw.example]...192.0.2.2[peer.example]"
    )


def test_crossing_child_deletes_remove_the_child_once_on_both_sides() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = i_sa.children
    (peer_child,) = r_sa.children
    held: list[tuple] = []  # type: ignore[type-arg]
    # both send their Delete before either sees the other's
    i_out = wire.initiator.engine.delete_child(i_sa, child, wire.now)
    r_out = wire.responder.engine.delete_child(r_sa, peer_child, wire.now)
    wire.run(i_out, wire.initiator, drop=lambda side, e: held.append((side, e)) or True)
    wire.run(r_out, wire.responder)
    assert r_sa.children == [] and i_sa.children == []
    # the initiator answered the responder's Delete without naming the child again (1.4.1)
    answer = [d for a, d in wire.log if a == "192.0.2.2"][-1]
    assert parse_message(answer).header.is_response
    assert wire.initiator.engine.counters["child_delete_collisions"] == 1
    # now the initiator's own Delete arrives: the child is unknown there, nothing breaks
    wire.run([e for _side, e in held], wire.initiator)
    assert wire.responder.engine.counters["delete_unknown_child_spi"] == 1
    assert i_sa.outstanding is None and r_sa.outstanding is None
    uninstalls = [e for e in wire.initiator.effects if isinstance(e, DeleteChildSa)]
    assert len(uninstalls) == 1


def test_a_delete_waits_for_the_busy_window() -> None:
    wire = pair()
    i_sa, _r_sa = established(wire)
    (child,) = i_sa.children
    liveness = informational.send_liveness(wire.initiator.engine, i_sa, wire.now)
    queued = wire.initiator.engine.delete_child(i_sa, child, wire.now)
    assert not [e for e in queued if isinstance(e, SendDatagram)] and len(i_sa.queued) == 1
    wire.run(liveness, wire.initiator)
    assert i_sa.children == [] and i_sa.queued == [] and i_sa.outstanding is None
    assert wire.initiator.engine.counters["liveness_confirmed"] == 1


def test_an_unanswered_ike_delete_removes_the_sa_after_the_retransmissions_without_restart() -> (
    None
):
    wire = pair()
    fast(wire)
    i_sa, _r_sa = established(wire)
    engine = wire.initiator.engine
    start = wire.now + 1
    engine.delete_ike(i_sa, start, "flushed")
    assert i_sa.state == IkeSaState.DELETING
    times = []
    while engine.sas:
        deadline = engine.next_deadline()
        assert deadline is not None
        engine.on_timer(deadline)
        times.append(deadline)
    assert times[-1] - start == total_timeout(FAST) == 7.0
    assert engine.counters["delete_unanswered"] == 1
    assert engine.counters["dpd_peer_dead"] == 0 and engine.counters["ike_sa_initiated"] == 1


def test_flush_twice_sends_one_delete() -> None:
    wire = pair()
    i_sa, _r_sa = established(wire)
    engine = wire.initiator.engine
    first = engine.delete_ike(i_sa, wire.now, "flushed")
    assert engine.delete_ike(i_sa, wire.now, "flushed") == []
    assert len([e for e in first if isinstance(e, SendDatagram)]) == 1


def _protected_request(wire: Wire, sa, payloads):  # type: ignore[no-untyped-def]
    """A request the initiator's engine would send, without touching its window."""
    message = Message(
        exchange_type=ExchangeType.INFORMATIONAL,
        spi_i=sa.spi_i,
        spi_r=sa.spi_r,
        message_id=sa.next_request_id,
        is_initiator=True,
        is_response=False,
        payloads=payloads,
        protected=True,
    )
    sk_e, sk_a = sa.outbound_keys()
    return encode_message(message, sa.protection, sk_e, sk_a)


def test_invalid_spi_is_logged_and_counted_never_acted_upon() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    (child,) = r_sa.children
    notify = NotifyPayload(NotifyType.INVALID_SPI, ProtocolId.ESP, data=child.spi_out)
    datagram = _protected_request(wire, i_sa, [notify])
    out = wire.responder.engine.receive(datagram, r_sa.local, i_sa.local, wire.now)
    (log,) = logs(out, "invalid_spi_notified")
    assert log.level == 1 and log.fields["child"] == child.unique_id
    assert wire.responder.engine.counters["invalid_spi_notified"] == 1
    assert r_sa.children == [child] and child.state == ChildSaState.INSTALLED
    assert not [e for e in out if isinstance(e, DeleteChildSa)]
    (answer,) = [e for e in out if isinstance(e, SendDatagram)]
    assert parse_message(answer.data).header.is_response


def test_unprotected_informational_is_never_acted_upon() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    before = (r_sa.expected_request_id, r_sa.last_seen, r_sa.remote)
    for payloads in (
        [DeletePayload(ProtocolId.IKE, [])],
        [NotifyPayload(NotifyType.INVALID_IKE_SPI)],
        [DeletePayload(ProtocolId.ESP, [r_sa.children[0].spi_out])],
    ):
        clear = Message(
            exchange_type=ExchangeType.INFORMATIONAL,
            spi_i=i_sa.spi_i,
            spi_r=i_sa.spi_r,
            message_id=r_sa.expected_request_id,
            is_initiator=True,
            is_response=False,
            payloads=payloads,
        )
        out = wire.responder.engine.receive(
            encode_message(clear), r_sa.local, Endpoint("203.0.113.9", 4500), wire.now + 50
        )
        assert not [e for e in out if isinstance(e, SendDatagram | DeleteChildSa)]
    assert wire.responder.engine.counters["dropped.unprotected_message"] == 3
    assert r_sa.state == IkeSaState.ESTABLISHED and len(r_sa.children) == 1
    assert (r_sa.expected_request_id, r_sa.last_seen, r_sa.remote) == before
    # the next genuine request is still in sequence
    wire.run(informational.send_liveness(wire.initiator.engine, i_sa, wire.now), wire.initiator)
    assert wire.initiator.engine.counters["liveness_confirmed"] == 1


def test_liveness_refreshes_last_seen_on_both_sides() -> None:
    wire = pair()
    i_sa, r_sa = established(wire)
    wire.now += 30
    wire.run(informational.send_liveness(wire.initiator.engine, i_sa, wire.now), wire.initiator)
    assert i_sa.last_seen == r_sa.last_seen == wire.now
    assert wire.responder.engine.counters["liveness_answered"] == 1
