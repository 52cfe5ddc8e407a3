"""MOBIKE notifies (RFC 4555 4) of any length and mix, in an authenticated INFORMATIONAL: the
responder never raises; a malformed one is answered with INVALID_SYNTAX, counted
(`dropped.mobike_*`), and changes nothing on the SA; a well-formed one gets an answer."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.constants import NotifyType
from ikefarm.shared.ikev2.effects import Endpoint, SendDatagram
from ikefarm.shared.ikev2.exchanges import mobike
from ikefarm.shared.ikev2.message import Message, parse_message
from ikefarm.shared.ikev2.payloads import NotifyPayload, Payload
from tests.engine_helpers import pair
from tests.unit.test_engine_mobike import MOBIKE_VPN, RawRequest, only_sa

KINDS = [
    NotifyType.UPDATE_SA_ADDRESSES,
    NotifyType.COOKIE2,
    NotifyType.ADDITIONAL_IP4_ADDRESS,
    NotifyType.ADDITIONAL_IP6_ADDRESS,
    NotifyType.NO_ADDITIONAL_ADDRESSES,
    NotifyType.NO_NATS_ALLOWED,
    NotifyType.NAT_DETECTION_SOURCE_IP,
    NotifyType.NAT_DETECTION_DESTINATION_IP,
]
# lengths around the ones the RFC allows, and anything else
LENGTHS = st.one_of(
    st.sampled_from([0, 3, 4, 5, 7, 8, 12, 16, 19, 20, 36, 64, 65]), st.integers(0, 90)
)
notify = st.builds(
    lambda kind, data: NotifyPayload(kind, data=data),
    st.sampled_from(KINDS),
    LENGTHS.flatmap(lambda n: st.binary(min_size=n, max_size=n)),
)


def _established():  # type: ignore[no-untyped-def]
    wire = pair(responder_vpn=MOBIKE_VPN, initiator_vpn=MOBIKE_VPN)
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    return wire


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(notify, min_size=1, max_size=6), st.integers(4500, 4510))
def test_mobike_notifies_never_raise_and_malformed_ones_change_nothing(
    payloads: list[Payload], source_port: int
) -> None:
    wire = _established()
    initiator, responder = wire.initiator.engine, wire.responder.engine
    i_sa, r_sa = only_sa(initiator), only_sa(responder)
    before = (r_sa.local, r_sa.remote, r_sa.peer_addresses, r_sa.nat_local, r_sa.nat_remote)
    try:
        mobike.read_notifies(Message(0, b"", b"", 0, True, False, list(payloads)))
        malformed = False
    except mobike.MalformedMobike:
        malformed = True
    i_sa.local = Endpoint("192.0.2.2", source_port)
    task = RawRequest(list(payloads))
    effects = initiator.queue_task(i_sa, task, wire.now)
    (request,) = [e for e in effects if isinstance(e, SendDatagram)]
    out = responder.receive(request.data, Endpoint("192.0.2.1", 4500), i_sa.local, wire.now)
    answers = [e for e in out if isinstance(e, SendDatagram)]
    assert len(answers) == 1 and answers[0].remote == i_sa.local  # answered where it came from
    parse_message(answers[0].data)
    if malformed:
        after = (r_sa.local, r_sa.remote, r_sa.peer_addresses, r_sa.nat_local, r_sa.nat_remote)
        assert after == before
        assert sum(v for k, v in responder.counters.items() if k.startswith("dropped.mobike_")) == 1
    # the SA still answers afterwards
    assert r_sa.state == "established"
