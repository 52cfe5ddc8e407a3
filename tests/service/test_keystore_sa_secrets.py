"""The keystore's SA snapshot secret endpoints over a real nats-server (docs/failover.md).

Secrets come in sealed to the transport key and leave sealed under the keystore's
snapshot key, bound to their KV key; they open again only sealed to the ephemeral
key of the worker that asks, and only under the key they were bound to. A
restarted keystore (same master key, same store) still opens them. Malformed
requests get a structured error, are counted, and the keystore keeps serving.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    SaSealReply,
    SaSealRequest,
    SaUnsealReply,
    SaUnsealRequest,
    TransportKeyReply,
    TransportKeyRequest,
)
from ikefarm.services.keystore.service import KeystoreService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.bus.sa_secrets import CHANNEL_INFO, MAX_BATCH, reply_label, request_label
from ikefarm.shared.bus.sealed import SealedChannel, SealError
from ikefarm.shared.config.loader import parse_config

pytestmark = pytest.mark.timeout(120)

KEYS = [os.urandom(48), os.urandom(200)]
BINDINGS = ["shard-0.00000000000000a1", "shard-1.00010000000000b2"]


async def start(tmp_path: Path, url: str) -> Runtime:
    config = parse_config(f'[keystore]\nstore-file = "{tmp_path / "keystore.bin"}"\n')
    runtime = Runtime(KeystoreService, config, url, instance="keystore-0")
    await runtime.start()
    return runtime


@pytest.fixture
async def keystore(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = await start(tmp_path, nats_server.url)
    try:
        yield runtime
    finally:
        await runtime.stop()


async def ask(nc: Client, subject: str, payload: bytes) -> bytes:
    raw = (await nc.request(subject, payload, timeout=5)).data
    for key in KEYS:
        assert key not in raw and key.hex().encode() not in raw
    return raw


async def channel(nc: Client) -> tuple[SealedChannel, bytes]:
    raw = await ask(nc, subjects.KEYSTORE_TRANSPORT_KEY, envelope.pack(TransportKeyRequest()))
    public = envelope.unpack_reply(raw, TransportKeyReply).public_key
    return SealedChannel.open_to(public, info=CHANNEL_INFO)


async def seal(nc: Client, bindings: list[str], keys: list[bytes]) -> list[bytes]:
    sealed, ephemeral = await channel(nc)
    items = [sealed.seal(request_label(b), k) for b, k in zip(bindings, keys, strict=True)]
    raw = await ask(
        nc, subjects.KEYSTORE_SA_SEAL, envelope.pack(SaSealRequest(ephemeral, bindings, items))
    )
    return envelope.unpack_reply(raw, SaSealReply).items


async def unseal(
    nc: Client, bindings: list[str], items: list[bytes]
) -> tuple[list[bytes | None], list[str]]:
    opened, ephemeral = await channel(nc)
    raw = await ask(
        nc, subjects.KEYSTORE_SA_UNSEAL, envelope.pack(SaUnsealRequest(ephemeral, bindings, items))
    )
    reply = envelope.unpack_reply(raw, SaUnsealReply)
    plain: list[bytes | None] = []
    for binding, item, why in zip(bindings, reply.items, reply.refused, strict=True):
        plain.append(None if why else opened.open(reply_label(binding), item))
    return plain, reply.refused


async def test_secrets_open_again_only_for_their_key_and_survive_a_restart(
    nats_server: EmbeddedNats, nats_client: Client, tmp_path: Path
) -> None:
    keystore = await start(tmp_path, nats_server.url)
    try:
        stored = await seal(nats_client, BINDINGS, KEYS)
        assert len(stored) == 2 and all(k not in s for k, s in zip(KEYS, stored, strict=True))
        plain, refused = await unseal(nats_client, BINDINGS, stored)
        assert plain == KEYS and refused == ["", ""]
        # swapped between keys, or one octet changed: refused item by item, the rest served
        broken = bytearray(stored[1])
        broken[20] ^= 0x40
        plain, refused = await unseal(nats_client, BINDINGS, [stored[1], bytes(broken)])
        assert plain == [None, None] and refused == ["seal_broken", "seal_broken"]
        plain, refused = await unseal(nats_client, BINDINGS, [stored[0], b"short"])
        assert plain == [KEYS[0], None] and keystore.counters["sa_unseal.refused"] == 3
    finally:
        await keystore.stop()
    keystore = await start(tmp_path, nats_server.url)  # the same store: the same snapshot key
    try:
        plain, _refused = await unseal(nats_client, BINDINGS, stored)
        assert plain == KEYS
    finally:
        await keystore.stop()


async def test_a_reply_sealed_to_one_worker_does_not_open_for_another(
    nats_client: Client, keystore: Runtime
) -> None:
    stored = await seal(nats_client, BINDINGS[:1], KEYS[:1])
    _mine, ephemeral = await channel(nats_client)
    other, _ = await channel(nats_client)
    raw = await ask(
        nats_client,
        subjects.KEYSTORE_SA_UNSEAL,
        envelope.pack(SaUnsealRequest(ephemeral, BINDINGS[:1], stored)),
    )
    (item,) = envelope.unpack_reply(raw, SaUnsealReply).items
    with pytest.raises(SealError):
        other.open(reply_label(BINDINGS[0]), item)


async def test_malformed_requests_are_refused_counted_and_the_keystore_serves_on(
    nats_client: Client, keystore: Runtime
) -> None:
    sealed, ephemeral = await channel(nats_client)
    good_item = sealed.seal(request_label(BINDINGS[0]), KEYS[0])
    bad = [
        SaSealRequest(ephemeral, BINDINGS, [good_item]),  # lengths differ
        SaSealRequest(ephemeral, [BINDINGS[1]], [good_item]),  # bound to another key
        SaSealRequest(b"\x00" * 5, BINDINGS[:1], [good_item]),  # not a public key
        SaSealRequest(ephemeral, ["x" * 65], [good_item]),
        SaSealRequest(ephemeral, ["b"] * (MAX_BATCH + 1), [good_item] * (MAX_BATCH + 1)),
    ]
    for request in bad:
        raw = await ask(nats_client, subjects.KEYSTORE_SA_SEAL, envelope.pack(request))
        with pytest.raises(BusError) as refused:
            envelope.unpack_reply(raw)
        assert refused.value.code == "bad_field"
    assert keystore.counters["sa_seal.bad_request"] == len(bad)

    good = {"ephemeral": ephemeral, "bindings": BINDINGS[:1], "items": [good_item]}

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        kind=st.sampled_from(["sa-seal-request", "sa-unseal-request"]),
        field=st.sampled_from(sorted(good)),
        value=st.one_of(
            st.none(),
            st.integers(-(2**63), 2**64 - 1),
            st.binary(max_size=100),
            st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=70)), max_size=4),
        ),
    )
    def case(kind: str, field: str, value: object) -> None:
        cases.append((kind, msgpack.packb({"v": 1, "kind": kind, "body": good | {field: value}})))

    cases: list[tuple[str, bytes]] = []
    case()
    for kind, payload in cases:
        subject = subjects.KEYSTORE_SA_SEAL if "-seal" in kind else subjects.KEYSTORE_SA_UNSEAL
        raw = await ask(nats_client, subject, payload)
        try:
            reply = envelope.unpack_reply(raw)
        except BusError as exc:
            assert exc.code in {"bad_field", "missing_field", "wrong_kind"}, exc
            continue
        # an unseal of garbage items is answered item by item: each one refused
        if isinstance(reply, dict) and "refused" in reply:
            assert all(reply["refused"])
    # still serving
    stored = await seal(nats_client, BINDINGS, KEYS)
    assert (await unseal(nats_client, BINDINGS, stored))[0] == KEYS
