"""The keystore's EAP/RADIUS endpoints over a real nats-server (docs/radius.md).

The RADIUS server is the test's UDP socket on loopback (an ephemeral port), answering
as a server would with pyrad; FreeRADIUS itself is in tests/interop. Malformed requests
get structured errors, nothing secret leaves, and a RADIUS server that never answers is
an "error" outcome after the configured tries, not a stuck endpoint.
"""

from __future__ import annotations

import asyncio
import io
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client
from pyrad.packet import AccessAccept, AccessRequest, Packet

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    EapAuthRequest,
    EapRelayReply,
    EapRelayRequest,
    PskAuthReply,
)
from ikefarm.services.keystore import radius
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.observability.logging import configure_logging

SECRET = b"radius-secret-of-the-service-test"
MSK = bytes(range(100, 164))
IDENTITY = b"\x02\x05\x00\x0a\x01alice"


def config(port: int, silent_port: int, tmp_path: Path) -> str:
    return f"""
[[ike.radius-server]]
name = "silent"
address = "127.0.0.1"
auth-port = {silent_port}
secret = "{SECRET.decode()}"
timeout = 0.2
retries = 0

[[ike.radius-server]]
name = "answering"
address = "127.0.0.1"
auth-port = {port}
secret = "{SECRET.decode()}"
timeout = 1.0
retries = 1

[keystore]
store-file = "{tmp_path / "keystore.bin"}"
"""


class Server(asyncio.DatagramProtocol):
    """Accepts every Access-Request with EAP-Success and the MS-MPPE keys of MSK."""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        request = Packet(secret=SECRET, packet=data)
        request.code = AccessRequest
        reply = request.CreateReply(message_authenticator=True)
        reply.code = AccessAccept
        encrypter = Packet(secret=SECRET, id=0)
        encrypter.request_authenticator = request.authenticator
        for kind, half in (
            (radius.MS_MPPE_RECV_KEY, MSK[:32]),
            (radius.MS_MPPE_SEND_KEY, MSK[32:]),
        ):
            value = encrypter.SaltCrypt(half)
            vsa = radius.VENDOR_MICROSOFT.to_bytes(4, "big") + bytes((kind, len(value) + 2)) + value
            reply.setdefault(radius.VENDOR_SPECIFIC, []).append(vsa)
        reply[radius.EAP_MESSAGE] = [bytes((3, IDENTITY[1], 0, 4))]
        self.transport.sendto(reply.ReplyPacket(), addr)


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(
        "keystore",
        "keystore-0",
        {"daemon": {"default": 3}, "authpriv": {"default": 3}},
        stream=stream,
    )
    yield stream
    configure_logging("keystore", "keystore-0", {"daemon": {"default": "disable"}})


@pytest.fixture
async def keystore(
    nats_server: EmbeddedNats, log_stream: io.StringIO, tmp_path: Path
) -> AsyncIterator[Runtime]:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        Server, local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers
    silent.bind(("127.0.0.1", 0))
    text = config(transport.get_extra_info("sockname")[1], silent.getsockname()[1], tmp_path)
    runtime = Runtime(KeystoreService, parse_config(text), nats_server.url, instance="keystore-0")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
        transport.close()
        silent.close()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


def assert_no_secret(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for secret in (SECRET, MSK, MSK[:32], MSK[32:]):
        assert secret not in raw and secret.hex().encode() not in raw


async def relay(nc: Client, request: EapRelayRequest) -> EapRelayReply:
    raw = (await nc.request(subjects.KEYSTORE_EAP_RELAY, envelope.pack(request), timeout=5)).data
    assert_no_secret(raw)
    return envelope.unpack_reply(raw, EapRelayReply)


async def test_relay_fails_over_accepts_and_the_sealed_msk_keys_the_auth(
    keystore: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    reply = await relay(client, EapRelayRequest("rw", "aa-bb", b"alice", IDENTITY))
    assert reply.outcome == "accept" and reply.server == 1 and reply.eap[0] == 3
    assert reply.sealed_msk and MSK not in reply.sealed_msk
    assert keystore.counters["radius.auth.failover"] == 1

    from ikefarm.shared.ikev2.crypto.prf import Prf

    prf = Prf(5)
    key = prf.compute(MSK, b"Key Pad for IKEv2")
    ask = EapAuthRequest(5, "aa-bb", reply.sealed_msk, b"v", prf.compute(key, b"v"), b"s")
    raw = (await client.request(subjects.KEYSTORE_EAP_AUTH, envelope.pack(ask), timeout=2)).data
    assert_no_secret(raw)
    answer = envelope.unpack_reply(raw, PskAuthReply)
    assert answer.verified and answer.auth == prf.compute(key, b"s")
    # bound to its session: another SA cannot use it
    other = EapAuthRequest(5, "cc-dd", reply.sealed_msk, b"v", prf.compute(key, b"v"), b"s")
    raw = (await client.request(subjects.KEYSTORE_EAP_AUTH, envelope.pack(other), timeout=2)).data
    assert envelope.unpack_reply(raw, PskAuthReply).reason == "msk_seal_broken"
    assert_no_secret(log_stream.getvalue())
    assert '"event": "eap_relay"' in log_stream.getvalue()


async def test_a_conversation_stays_with_its_silent_server_and_errors(
    keystore: Runtime, client: Client
) -> None:
    reply = await relay(client, EapRelayRequest("rw", "s", b"alice", IDENTITY, b"st", server=0))
    assert reply.outcome == "error" and reply.reason.startswith("radius_unavailable")
    assert keystore.counters["radius.auth.failover"] == 0


@pytest.mark.parametrize(
    ("subject", "payload", "code"),
    [
        (subjects.KEYSTORE_EAP_RELAY, b"\xc1garbage", "bad_encoding"),
        (
            subjects.KEYSTORE_EAP_RELAY,
            msgpack.packb({"v": 1, "kind": "ping", "body": {}}),
            "wrong_kind",
        ),
        (
            subjects.KEYSTORE_EAP_AUTH,
            envelope.pack(EapAuthRequest(99, "s", b"", b"", b"", b"")),
            "bad_field",
        ),
    ],
)
async def test_malformed_requests_get_structured_errors(
    keystore: Runtime, client: Client, subject: str, payload: bytes, code: str
) -> None:
    raw = (await client.request(subject, payload, timeout=2)).data
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(raw)
    assert refused.value.code == code
    reply = await relay(client, EapRelayRequest("rw", "x", b"alice", IDENTITY))
    assert reply.outcome == "accept"  # still serving


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    body=st.dictionaries(
        st.sampled_from(["vpn", "session", "identity", "eap", "state", "server"]),
        st.binary(max_size=20) | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5),
        max_size=6,
    )
)
async def test_any_relay_body_is_answered_or_refused(
    keystore: Runtime, client: Client, body: dict
) -> None:  # type: ignore[type-arg]
    payload = msgpack.packb({"v": 1, "kind": "eap-relay-request", "body": body})
    raw = (await client.request(subjects.KEYSTORE_EAP_RELAY, payload, timeout=5)).data
    assert_no_secret(raw)
