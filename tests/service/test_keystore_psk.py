"""The keystore's PSK AUTH endpoint over a real nats-server: RFC 7296 2.15, no secret out."""

from __future__ import annotations

import hashlib
import hmac
import io
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import nats
import pytest
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import PskAuthReply, PskAuthRequest
from ikefarm.services.keystore.psk import PskEntry, PskStore
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.kinds import Secret
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import PrfId
from ikefarm.shared.observability.logging import configure_logging

EXACT = b"exact-secret-for-gw-and-peer"
LOCAL_ONLY = b"any-peer-of-gw-secret"
REMOTE_ONLY = b"other-peer-from-anywhere"
SECRETS = (EXACT, LOCAL_ONLY, REMOTE_ONLY)

# the less specific entry comes first: order must not beat specificity
CONFIG = f"""
[[ike.pre-shared-key]]
name = "gw-any"
local-id = "gw.example"
secret = "0x{LOCAL_ONLY.hex()}"

[[ike.pre-shared-key]]
name = "gw-peer"
local-id = "gw.example"
remote-id = "peer.example"
secret = "{EXACT.decode()}"

[[ike.pre-shared-key]]
remote-id = "other.example"
secret = "{REMOTE_ONLY.decode()}"
"""

VERIFY_OCTETS = b"IKE_SA_INIT request | Nr | prf(SK_pi, IDi')"
SIGN_OCTETS = b"IKE_SA_INIT response | Ni | prf(SK_pr, IDr')"
HASHES = {PrfId.HMAC_SHA1: hashlib.sha1, PrfId.HMAC_SHA2_256: hashlib.sha256}
HASHES |= {PrfId.HMAC_SHA2_384: hashlib.sha384, PrfId.HMAC_SHA2_512: hashlib.sha512}


def expected_auth(psk: bytes, octets: bytes, prf_id: int = PrfId.HMAC_SHA2_256) -> bytes:
    """RFC 7296 2.15, computed independently of the keystore with the standard library."""
    digest = HASHES[prf_id]
    pad_key = hmac.new(psk, b"Key Pad for IKEv2", digest).digest()
    return hmac.new(pad_key, octets, digest).digest()


def request(
    psk: bytes | None,
    local_id: str = "gw.example",
    remote_id: str = "peer.example",
    prf_id: int = PrfId.HMAC_SHA2_256,
    verify_auth: bytes | None = None,
) -> PskAuthRequest:
    if verify_auth is None:
        verify_auth = expected_auth(psk, VERIFY_OCTETS, prf_id) if psk else b"\x00" * 32
    return PskAuthRequest(
        prf_id=prf_id,
        local_id=local_id,
        remote_id=remote_id,
        verify_octets=VERIFY_OCTETS,
        verify_auth=verify_auth,
        sign_octets=SIGN_OCTETS,
    )


def assert_no_secret(data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    for secret in SECRETS:
        assert secret not in raw
        assert secret.hex().encode() not in raw


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """Everything logged up to level 3, where no secret may appear (level 4 is for keys)."""
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
    config = parse_config(CONFIG + f'[keystore]\nstore-file = "{tmp_path / "keystore.bin"}"\n')
    runtime = Runtime(KeystoreService, config, nats_server.url, instance="keystore-0")
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def ask(nc: Client, payload: bytes) -> bytes:
    raw = (await nc.request(subjects.KEYSTORE_PSK_AUTH, payload, timeout=2)).data
    assert_no_secret(raw)
    return raw


async def auth(nc: Client, psk_request: PskAuthRequest) -> PskAuthReply:
    return envelope.unpack_reply(await ask(nc, envelope.pack(psk_request)), PskAuthReply)


async def test_verified_peer_gets_our_known_answer_auth(
    keystore: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    reply = await auth(client, request(EXACT))
    assert reply == PskAuthReply(verified=True, auth=expected_auth(EXACT, SIGN_OCTETS))
    for prf_id in (PrfId.HMAC_SHA1, PrfId.HMAC_SHA2_384, PrfId.HMAC_SHA2_512):
        reply = await auth(client, request(EXACT, prf_id=prf_id))
        assert reply.verified and reply.auth == expected_auth(EXACT, SIGN_OCTETS, prf_id)
    assert keystore.counters["psk_auth.verified"] == 4
    assert_no_secret(log_stream.getvalue())


async def test_wrong_auth_is_a_mismatch_without_our_auth(
    keystore: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    # the peer signed with another PSK: no AUTH of ours leaves the keystore
    reply = await auth(client, request(EXACT, verify_auth=expected_auth(b"guess", VERIFY_OCTETS)))
    assert reply == PskAuthReply(verified=False, auth=b"", reason="auth_mismatch")
    truncated = expected_auth(EXACT, VERIFY_OCTETS)[:-1]
    reply = await auth(client, request(EXACT, verify_auth=truncated))
    assert reply.reason == "auth_mismatch" and reply.auth == b""
    assert keystore.counters["psk_auth.mismatch"] == 2
    logged = log_stream.getvalue()
    assert '"event": "psk_auth"' in logged and '"result": "mismatch"' in logged
    assert_no_secret(logged)


async def test_unknown_identities_have_no_secret(keystore: Runtime, client: Client) -> None:
    reply = await auth(client, request(None, local_id="nobody.example", remote_id="x.example"))
    assert reply == PskAuthReply(verified=False, auth=b"", reason="no_secret")
    assert keystore.counters["psk_auth.no_secret"] == 1


@pytest.mark.parametrize(
    ("local_id", "remote_id", "psk"),
    [
        ("gw.example", "peer.example", EXACT),  # both named beats local-only listed first
        ("gw.example", "someone.example", LOCAL_ONLY),  # remote-id unset matches anyone
        ("other-gw.example", "other.example", REMOTE_ONLY),  # local-id unset matches any
    ],
)
async def test_the_most_specific_entry_is_chosen(
    keystore: Runtime, client: Client, local_id: str, remote_id: str, psk: bytes
) -> None:
    reply = await auth(client, request(psk, local_id=local_id, remote_id=remote_id))
    assert reply.verified and reply.auth == expected_auth(psk, SIGN_OCTETS)
    for other in SECRETS:
        if other != psk:
            wrong = await auth(client, request(other, local_id=local_id, remote_id=remote_id))
            assert wrong.reason == "auth_mismatch"


def test_selection_ties_and_wildcards() -> None:
    def entry(index: int, local_id: str | None, remote_id: str | None) -> PskEntry:
        return PskEntry(index, f"e{index}", local_id, remote_id, Secret(b"psk-value-%d" % index))

    store = PskStore(
        [
            entry(0, None, None),
            entry(1, "%any", "peer"),
            entry(2, "gw", None),
            entry(3, "gw", "peer"),
            entry(4, "gw", "peer"),
        ]
    )
    assert store.select("gw", "peer").index == 3  # most specific, first of equals
    assert store.select("other", "peer").index == 1
    assert store.select("gw", "other").index == 2
    assert store.select("x", "y").index == 0  # the catch-all
    assert PskStore([entry(5, "gw", "peer")]).select("gw", "x") is None
    text = repr(store) + repr(store.select("gw", "peer")) + str(store.select("gw", "peer"))
    assert "psk-value" not in text and "7073" not in text


async def test_unknown_prf_is_a_structured_error(keystore: Runtime, client: Client) -> None:
    for prf_id in (PrfId.AES128_XCBC, 0, 9999):
        raw = await ask(client, envelope.pack(request(EXACT, prf_id=prf_id, verify_auth=b"x")))
        with pytest.raises(BusError) as refused:
            envelope.unpack_reply(raw)
        assert refused.value.code == "bad_field"
        assert f"prf_id {prf_id}" in refused.value.message
    assert keystore.counters["bus_refused.bad_field"] == 3
    assert (await auth(client, request(EXACT))).verified


def _body_without(field: str) -> bytes:
    body = envelope._to_wire(request(EXACT))
    del body[field]
    return msgpack.packb({"v": 1, "kind": "psk-auth-request", "body": body})


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"\xc1 definitely not msgpack", "bad_encoding"),
        (msgpack.packb({"v": 0, "kind": "psk-auth-request", "body": {}}), "bad_version"),
        (_body_without("verify_auth"), "missing_field"),
        (_body_without("prf_id"), "missing_field"),
        (
            msgpack.packb(
                {"v": 1, "kind": "psk-auth-request", "body": {"prf_id": "sha256", "local_id": 1}}
            ),
            "bad_field",
        ),
        (msgpack.packb({"v": 1, "kind": "ping", "body": {}}), "wrong_kind"),
    ],
)
async def test_malformed_requests_get_structured_errors(
    keystore: Runtime, client: Client, payload: bytes, code: str
) -> None:
    raw = await ask(client, payload)
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(raw)
    assert refused.value.code == code
    assert keystore.counters[f"bus_refused.{code}"] == 1
    assert (await auth(client, request(EXACT))).verified


async def test_secrets_are_in_no_repr_stats_or_log(
    keystore: Runtime, client: Client, log_stream: io.StringIO
) -> None:
    await auth(client, request(EXACT))
    await auth(client, request(LOCAL_ONLY, remote_id="z"))
    await auth(client, request(None, local_id="none"))
    service = keystore.service
    assert isinstance(service, KeystoreService)
    assert_no_secret(repr(service.psks) + repr(service.psks.select("gw.example", "peer.example")))
    assert_no_secret(repr(service.gauges()) + repr(dict(keystore.counters)))
    assert_no_secret(log_stream.getvalue())
    assert '"event": "psk_loaded"' in log_stream.getvalue()


def test_purposes_sign_only_and_verify_only() -> None:
    from ikefarm.services.keystore.psk import PskEntry, PskStore, UnknownPurpose
    from ikefarm.shared.config.kinds import Secret

    secret = b"purpose-secret"
    store = PskStore(
        [PskEntry(index=0, name=None, local_id="a", remote_id="b", secret=Secret(secret))]
    )
    key = hmac.new(secret, b"Key Pad for IKEv2", hashlib.sha256).digest()
    sign = PskAuthRequest(5, "a", "b", b"", b"", b"ours", purpose="sign")
    reply, _ = store.authenticate(sign)
    assert reply.verified and reply.auth == hmac.new(key, b"ours", hashlib.sha256).digest()
    good = hmac.new(key, b"theirs", hashlib.sha256).digest()
    reply, _ = store.authenticate(
        PskAuthRequest(5, "a", "b", b"theirs", good, b"x", purpose="verify")
    )
    assert reply.verified and reply.auth == b""
    reply, _ = store.authenticate(
        PskAuthRequest(5, "a", "b", b"theirs", b"bad", b"x", purpose="verify")
    )
    assert not reply.verified and reply.reason == "auth_mismatch"
    with pytest.raises(UnknownPurpose):
        store.authenticate(PskAuthRequest(5, "a", "b", b"", b"", b"", purpose="leak"))
