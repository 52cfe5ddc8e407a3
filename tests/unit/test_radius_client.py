"""The keystore's RADIUS client (services/keystore/radius.py, eap.py; docs/radius.md).

Answers are built with pyrad as a RADIUS server builds them. The client's exchange runs
against a UDP socket of the test that answers with what the test gives it (bad answers
first): a real server never sends those, so this stand-in is the only way to see them
dropped. The whole path against a real FreeRADIUS is tests/interop/test_eap_radius_*.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyrad.packet import (
    AccessAccept,
    AccessChallenge,
    AccessReject,
    AccessRequest,
    AccountingResponse,
    Packet,
)

from ikefarm.proto.messages import EapAuthRequest, EapRelayRequest, RadiusAccounting
from ikefarm.services.keystore import eap, radius
from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.ikev2.crypto.prf import Prf

SECRET = b"radius-secret-for-unit-tests"
EAP_IDENTITY_RESPONSE = b"\x02\x07\x00\x0a\x01alice"


def server(port: int = 1812, retries: int = 0, timeout: float = 0.5) -> radius.RadiusServer:
    return radius.RadiusServer(
        "s", "127.0.0.1", port, port, Secret(SECRET), timeout, retries, "nas-1"
    )


def request_packet() -> Packet:
    client = radius.RadiusClient([server()])
    packet = client._packet(client.servers[0], AccessRequest, [(radius.USER_NAME, b"alice")])
    packet.RequestPacket()
    return packet


def answer(
    request: Packet,
    code: int = AccessChallenge,
    attributes: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    *,
    message_authenticator: bool = True,
) -> bytes:
    reply = request.CreateReply(message_authenticator=message_authenticator or None)
    reply.code = code
    for kind, value in attributes:
        reply.setdefault(kind, []).append(value)
    if message_authenticator:
        reply.add_message_authenticator()
    return reply.ReplyPacket()


def mppe(request: Packet, kind: int, key: bytes) -> tuple[int, bytes]:
    """An MS-MPPE-*-Key VSA salt-encrypted for `request` (RFC 2548 2.4.2)."""
    encrypter = Packet(secret=SECRET, id=0)
    encrypter.request_authenticator = request.authenticator
    value = encrypter.SaltCrypt(key)
    sub = struct.pack("!BB", kind, len(value) + 2) + value
    return radius.VENDOR_SPECIFIC, struct.pack("!L", radius.VENDOR_MICROSOFT) + sub


# -- answers checked ----------------------------------------------------------------------


def test_a_good_answer_is_taken() -> None:
    request = request_packet()
    reply = radius.check_reply(request, answer(request, attributes=[(radius.STATE, b"s1")]))
    assert isinstance(reply, Packet) and reply.code == AccessChallenge
    assert reply[radius.STATE] == [b"s1"]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda raw: raw[:10], "truncated"),
        (lambda raw: raw[:4] + bytes(16) + raw[20:], "bad_authenticator"),
        (lambda raw: raw[:1] + bytes([(raw[1] + 1) % 256]) + raw[2:], "wrong_identifier"),
        (lambda raw: raw[:2] + struct.pack("!H", len(raw) + 10) + raw[4:], "malformed"),
        (lambda raw: raw + b"\x4f", "bad_authenticator"),  # padding past Length is ignored...
        (lambda raw: raw[:20] + b"\x01\x01" + raw[22:], "malformed"),  # attribute length 1
        (lambda raw: bytes([5]) + raw[1:], "unexpected_code"),
    ],
)
def test_bad_answers_are_dropped_with_their_reason(mangle, reason) -> None:  # type: ignore[no-untyped-def]
    request = request_packet()
    raw = answer(request)
    if reason == "bad_authenticator" and len(mangle(raw)) > len(raw):
        # ...so a trailing octet outside Length changes nothing: the answer stays good
        assert isinstance(radius.check_reply(request, mangle(raw)), Packet)
        return
    assert radius.check_reply(request, mangle(raw)) == reason


def test_an_access_answer_without_message_authenticator_is_dropped() -> None:
    request = request_packet()
    raw = answer(request, AccessAccept, message_authenticator=False)
    assert radius.check_reply(request, raw) == "no_message_authenticator"


def test_a_forged_message_authenticator_is_dropped() -> None:
    request = request_packet()
    raw = bytearray(answer(request))
    index = raw.index(bytes((radius.MESSAGE_AUTHENTICATOR, 18)), 20)
    raw[index + 2] ^= 1
    # the Response Authenticator covers the attributes: recompute it over the forged one
    import hashlib

    raw[4:20] = hashlib.md5(
        bytes(raw[:4]) + request.authenticator + bytes(raw[20:]) + SECRET
    ).digest()
    assert radius.check_reply(request, bytes(raw)) == "bad_authenticator"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_octets_as_an_answer_are_decided_without_raising(data: bytes) -> None:
    request = request_packet()
    assert isinstance(radius.check_reply(request, data), str | Packet)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 255), st.binary(max_size=40)), max_size=12))
def test_signed_answers_with_any_attributes_parse_without_raising(attributes) -> None:  # type: ignore[no-untyped-def]
    request = request_packet()
    # not Message-Authenticator (the answer's own) nor Proxy-State (a reply with one the
    # request did not send is refused: BlastRADIUS)
    raw = answer(request, AccessAccept, [(k, v) for k, v in attributes if k not in (33, 80)])
    reply = radius.check_reply(request, raw)
    assert isinstance(reply, Packet)
    found = radius.framed_attributes(reply)
    assert set(found) <= {"address", "dns", "nbns", "netmask"}
    assert radius.mppe_msk(reply, request) is None or len(radius.mppe_msk(reply, request)) == 64


# -- attributes -------------------------------------------------------------------------------


def test_mppe_keys_make_the_msk_recv_then_send() -> None:
    request = request_packet()
    recv, send = bytes(range(32)), bytes(range(32, 64))
    raw = answer(
        request,
        AccessAccept,
        [
            mppe(request, radius.MS_MPPE_RECV_KEY, recv),
            mppe(request, radius.MS_MPPE_SEND_KEY, send),
        ],
    )
    reply = radius.check_reply(request, raw)
    assert isinstance(reply, Packet)
    assert radius.mppe_msk(reply, request) == recv + send
    only_one = radius.check_reply(
        request, answer(request, AccessAccept, [mppe(request, radius.MS_MPPE_RECV_KEY, recv)])
    )
    assert isinstance(only_one, Packet) and radius.mppe_msk(only_one, request) is None


def test_framed_attributes_become_pool_keywords() -> None:
    request = request_packet()
    ms_dns = struct.pack("!LBB", radius.VENDOR_MICROSOFT, radius.MS_PRIMARY_DNS_SERVER, 6)
    raw = answer(
        request,
        AccessAccept,
        [
            (radius.FRAMED_IP_ADDRESS, bytes([10, 9, 0, 42])),
            (radius.FRAMED_IP_ADDRESS, bytes([255, 255, 255, 254])),  # NAS chooses: none
            (radius.FRAMED_IP_NETMASK, bytes([255, 255, 255, 0])),
            (
                radius.FRAMED_IPV6_PREFIX,
                b"\x00\x80" + bytes.fromhex("20010db8000900000000000000000007"),
            ),
            (radius.DNS_SERVER_IPV6_ADDRESS, bytes.fromhex("20010db8000000000000000000000053")),
            (radius.VENDOR_SPECIFIC, ms_dns + bytes([10, 100, 0, 53])),
            (radius.FRAMED_IP_ADDRESS, b"\x01\x02"),  # wrong length: ignored
        ],
    )
    reply = radius.check_reply(request, raw)
    assert isinstance(reply, Packet)
    assert radius.framed_attributes(reply) == {
        "address": ["10.9.0.42", "2001:db8:9::7"],
        "netmask": ["255.255.255.0"],
        "dns": ["10.100.0.53", "2001:db8::53"],
    }


def test_an_eap_message_is_split_in_253_octet_attributes() -> None:
    message = bytes(600)
    chunks = radius.split_eap(message)
    assert [len(c) for c in chunks] == [253, 253, 94] and b"".join(chunks) == message


# -- the exchange: retransmission, bad answers dropped, failover -------------------------------


class Responder(asyncio.DatagramProtocol):
    """The test's UDP end: answers each request with the next of `script` (a function of
    the request's octets), or stays silent for None."""

    def __init__(self, script: list) -> None:  # type: ignore[type-arg]
        self.script = script
        self.seen: list[bytes] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        self.seen.append(data)
        step = self.script.pop(0) if self.script else None
        for raw in step(data) if step is not None else ():
            assert self.transport is not None
            self.transport.sendto(raw, addr)


def reply_to(data: bytes, code: int = AccessChallenge, **kwargs) -> bytes:  # type: ignore[no-untyped-def]
    request = Packet(secret=SECRET, packet=data)
    request.code = data[0]
    return answer(request, code, **kwargs)


async def udp_responder(script: list) -> tuple[Responder, int, asyncio.DatagramTransport]:  # type: ignore[type-arg]
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        lambda: Responder(script), local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    port = transport.get_extra_info("sockname")[1]
    return protocol, port, transport


async def test_bad_answers_are_counted_and_the_good_one_is_taken() -> None:
    def bad_then_good(data: bytes) -> list[bytes]:
        good = reply_to(data, AccessChallenge, attributes=[(radius.STATE, b"st")])
        forged = good[:4] + bytes(16) + good[20:]
        unsigned = reply_to(data, AccessChallenge, message_authenticator=False)
        return [b"\x0b\x01\x00", forged, unsigned, good[:25], good]

    protocol, port, transport = await udp_responder([bad_then_good])
    counters: Counter[str] = Counter()
    client = radius.RadiusClient([server(port)], counters)
    try:
        got = await client.access([(radius.USER_NAME, b"alice")])
    finally:
        transport.close()
    assert got.packet[radius.STATE] == [b"st"] and got.server == 0
    assert counters["radius.dropped.truncated"] == 1
    assert counters["radius.dropped.bad_authenticator"] == 1
    assert counters["radius.dropped.no_message_authenticator"] == 1
    assert counters["radius.dropped.malformed"] == 1
    assert counters["radius.auth.answered"] == 1
    # the request carried a valid Message-Authenticator, first (RFC 3579 3.2)
    sent = Packet(secret=SECRET, packet=protocol.seen[0])
    assert sent.code == AccessRequest and protocol.seen[0][20] == radius.MESSAGE_AUTHENTICATOR
    assert sent.verify_message_authenticator()
    assert sent[radius.NAS_IDENTIFIER] == [b"nas-1"]


async def test_a_silent_server_is_retried_then_the_next_one_answers() -> None:
    silent, silent_port, t1 = await udp_responder([None, None])
    _answering, port, t2 = await udp_responder([lambda d: [reply_to(d, AccessReject)]])
    counters: Counter[str] = Counter()
    client = radius.RadiusClient(
        [server(silent_port, retries=1, timeout=0.2), server(port)], counters
    )
    try:
        got = await client.access([(radius.USER_NAME, b"alice")])
    finally:
        t1.close()
        t2.close()
    assert got.packet.code == AccessReject and got.server == 1
    assert len(silent.seen) == 2 and silent.seen[0] == silent.seen[1]  # the same request again
    assert counters["radius.auth.retransmitted"] == 1
    assert counters["radius.auth.failover"] == 1 and counters["radius.auth.server_timeout"] == 1


async def test_no_answer_at_all_is_radius_unavailable_and_a_relay_error() -> None:
    _silent, port, transport = await udp_responder([None])
    client = radius.RadiusClient([server(port, timeout=0.2)])
    relay = eap.EapRelay(client, eap.new_msk_key(), Counter())
    try:
        reply = await relay.relay(
            EapRelayRequest(vpn="rw", session="s", identity=b"alice", eap=EAP_IDENTITY_RESPONSE)
        )
    finally:
        transport.close()
    assert reply.outcome == "error" and reply.reason.startswith("radius_unavailable")


async def test_a_relayed_accept_seals_the_msk_and_the_auth_uses_it() -> None:
    msk = bytes(range(64))

    def accept(data: bytes) -> list[bytes]:
        request = Packet(secret=SECRET, packet=data)
        request.code = AccessRequest
        attributes = [
            (radius.EAP_MESSAGE, b"\x03\x07\x00\x04"),
            mppe(request, radius.MS_MPPE_RECV_KEY, msk[:32]),
            mppe(request, radius.MS_MPPE_SEND_KEY, msk[32:]),
            (radius.FRAMED_IP_ADDRESS, bytes([10, 9, 0, 42])),
        ]
        return [answer(request, AccessAccept, attributes)]

    protocol, port, transport = await udp_responder([accept])
    relay = eap.EapRelay(radius.RadiusClient([server(port)]), eap.new_msk_key(), Counter())
    try:
        reply = await relay.relay(
            EapRelayRequest(
                vpn="rw", session="a-b", identity=b"alice", eap=EAP_IDENTITY_RESPONSE, state=b"x"
            )
        )
    finally:
        transport.close()
    assert reply.outcome == "accept" and reply.eap == b"\x03\x07\x00\x04"
    assert reply.attributes == {"address": ["10.9.0.42"]}
    assert msk not in reply.sealed_msk and relay.open_msk("a-b", reply.sealed_msk) == msk
    assert relay.open_msk("another-session", reply.sealed_msk) is None
    sent = Packet(secret=SECRET, packet=protocol.seen[0])
    assert sent[radius.EAP_MESSAGE] == [EAP_IDENTITY_RESPONSE] and sent[radius.STATE] == [b"x"]

    prf = Prf(5)  # hmac-sha256
    key = prf.compute(msk, eap.KEY_PAD)
    verify, sign = b"initiator signed octets", b"responder signed octets"
    auth = relay.auth(
        EapAuthRequest(5, "a-b", reply.sealed_msk, verify, prf.compute(key, verify), sign)
    )
    assert auth.verified and auth.auth == prf.compute(key, sign)
    wrong = relay.auth(EapAuthRequest(5, "a-b", reply.sealed_msk, verify, bytes(32), sign))
    assert not wrong.verified and wrong.auth == b"" and wrong.reason == "auth_mismatch"
    broken = relay.auth(EapAuthRequest(5, "a-b", reply.sealed_msk[:-1], verify, b"", sign))
    assert broken.reason == "msk_seal_broken"


async def test_a_challenge_without_eap_message_is_a_reject() -> None:
    _p, port, transport = await udp_responder([lambda d: [reply_to(d, AccessChallenge)]])
    relay = eap.EapRelay(radius.RadiusClient([server(port)]), eap.new_msk_key(), Counter())
    try:
        reply = await relay.relay(
            EapRelayRequest(vpn="rw", session="s", identity=b"alice", eap=EAP_IDENTITY_RESPONSE)
        )
    finally:
        transport.close()
    assert reply.outcome == "reject" and reply.reason == "no_eap_message"


async def test_accounting_requests_carry_the_session_and_counters() -> None:
    protocol, port, transport = await udp_responder(
        [lambda d: [reply_to(d, AccountingResponse, message_authenticator=False)]]
    )
    relay = eap.EapRelay(radius.RadiusClient([server(port)]), eap.new_msk_key(), Counter())
    try:
        reply = await relay.account(
            RadiusAccounting(
                status="stop",
                session="sess-1",
                identity="alice",
                framed_addresses=["10.9.0.42"],
                session_time=61,
                input_octets=(5 << 32) + 7,
                terminate_cause="user-request",
            )
        )
    finally:
        transport.close()
    assert reply.sent
    sent = Packet(secret=SECRET, packet=protocol.seen[0])
    assert sent[radius.ACCT_SESSION_ID] == [b"sess-1"]
    assert sent[radius.ACCT_STATUS_TYPE] == [struct.pack("!L", 2)]
    assert sent[radius.ACCT_INPUT_OCTETS] == [struct.pack("!L", 7)]
    assert sent[radius.ACCT_INPUT_GIGAWORDS] == [struct.pack("!L", 5)]
    assert sent[radius.FRAMED_IP_ADDRESS] == [bytes([10, 9, 0, 42])]
    assert sent[radius.ACCT_TERMINATE_CAUSE] == [struct.pack("!L", 1)]
    # RFC 2866 3: the Request Authenticator is the MD5 over the packet and the secret
    import hashlib

    raw = protocol.seen[0]
    assert raw[4:20] == hashlib.md5(raw[:4] + bytes(16) + raw[20:] + SECRET).digest()


def test_servers_repr_and_config_never_show_the_secret() -> None:
    client = radius.RadiusClient([server()])
    assert "radius-secret" not in repr(client) and "radius-secret" not in repr(client.servers)
    relay = eap.EapRelay(client, eap.new_msk_key(), Counter())
    assert "radius-secret" not in repr(relay)
