"""Child SA keys reach the kernel service sealed (shared/bus/child_keys.py), never in clear.

Over a real nats-server: the kernel service publishes its transport key, opens
a sealed install, refuses one with keys in clear (bad_field), one sealed to
another key or moved onto other SPIs (KernelAck "sealed keys do not open",
counted). Who may ask for the transport key and who may answer comes from
`proto/subjects.py` permissions. The unpacking of the opened keys is fuzzed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import KernelAck, TransportKeyReply, TransportKeyRequest
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.child_keys import (
    SEALED_KEYS_REFUSED,
    ChildKeyOpener,
    ChildKeys,
    ChildKeySealer,
    open_child_keys,
    seal_child_keys,
)
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.bus.sealed import SealedChannel, SealError, public_bytes
from ikefarm.shared.config.loader import parse_config
from tests.service.test_bus_permissions import nats_match
from tests.service.test_kernel_memory import ENCR_KEY_IN, ENCR_KEY_OUT, KEYS, ask, child

# the test double: a kernel service here must not program the host (auto would)
MEMORY_BACKEND = '[kernel]\nbackend = "memory"\n'

SPI_IN, SPI_OUT = bytes.fromhex("c0000001"), bytes.fromhex("c1000001")
CHILD_KEYS = ChildKeys(ENCR_KEY_IN, ENCR_KEY_OUT, b"", b"")


@pytest.fixture
async def kernel(nats_server: EmbeddedNats) -> AsyncIterator[Runtime]:
    runtime = Runtime(
        KernelService, parse_config(MEMORY_BACKEND), nats_server.url, instance="kernel-s"
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def transport_key(nc: Client) -> bytes:
    raw = await ask(nc, subjects.KERNEL_TRANSPORT_KEY, envelope.pack(TransportKeyRequest()))
    return envelope.unpack_reply(raw, TransportKeyReply).public_key


async def send_install(nc: Client, payload: bytes) -> KernelAck:
    assert not any(key in payload for key in KEYS)  # the check is on what goes on the bus
    return envelope.unpack_reply(await ask(nc, subjects.KERNEL_CHILD_INSTALL, payload), KernelAck)


def test_seal_and_open_round_trip_and_bind_the_spis() -> None:
    transport = X25519PrivateKey.generate()
    keys = ChildKeys(bytes(range(36)), bytes(range(36, 72)), bytes(32), bytes(range(32)))
    ephemeral, sealed = seal_child_keys(public_bytes(transport), SPI_IN, SPI_OUT, keys)
    assert open_child_keys(transport, ephemeral, sealed, SPI_IN, SPI_OUT) == keys
    for key in (keys.encr_key_in, keys.encr_key_out, keys.integ_key_out):
        assert key not in sealed and key.hex() not in repr(keys)
    with pytest.raises(SealError):  # moved onto another child
        open_child_keys(transport, ephemeral, sealed, SPI_OUT, SPI_IN)
    with pytest.raises(SealError):  # sealed to another service's key
        open_child_keys(X25519PrivateKey.generate(), ephemeral, sealed, SPI_IN, SPI_OUT)
    # a channel to the keystore (another HKDF info) does not open a kernel seal
    keystore_channel = SealedChannel.accept(transport, ephemeral)
    with pytest.raises(SealError):
        keystore_channel.open(b"child-keys" + SPI_IN + SPI_OUT, sealed)


def test_a_sealer_reuses_its_ephemeral_key_within_bounds_and_the_opener_its_channel() -> None:
    transport = X25519PrivateKey.generate()
    public = public_bytes(transport)
    keys = ChildKeys(bytes(range(36)), bytes(range(36, 72)), bytes(32), bytes(range(32)))
    sealer = ChildKeySealer(uses=3, seconds=10.0)
    opener = ChildKeyOpener(transport, size=2)
    sealed = [sealer.seal(public, SPI_IN, SPI_OUT, keys, now=0.0) for _ in range(3)]
    assert len({ephemeral for ephemeral, _ in sealed}) == 1  # one key for three seals
    assert len({blob for _, blob in sealed}) == 3  # each with its own nonce
    for ephemeral, blob in sealed:  # both sides agree, the plain function too
        assert opener.open(ephemeral, blob, SPI_IN, SPI_OUT) == keys
        assert open_child_keys(transport, ephemeral, blob, SPI_IN, SPI_OUT) == keys
    with pytest.raises(SealError):  # a remembered channel still names the SPIs
        opener.open(sealed[0][0], sealed[0][1], SPI_OUT, SPI_IN)
    fourth, _ = sealer.seal(public, SPI_IN, SPI_OUT, keys, now=0.0)  # uses spent
    later, _ = sealer.seal(public, SPI_IN, SPI_OUT, keys, now=11.0)  # too old
    other_kernel = public_bytes(X25519PrivateKey.generate())
    moved, _ = sealer.seal(other_kernel, SPI_IN, SPI_OUT, keys, now=11.0)  # another key
    assert len({sealed[0][0], fourth, later, moved}) == 4
    sealer.forget()
    assert sealer.seal(other_kernel, SPI_IN, SPI_OUT, keys, now=11.0)[0] != moved
    assert "uses_left" in repr(sealer) and "channels" in repr(opener)


def test_an_opener_remembers_a_few_channels_and_only_those_that_opened() -> None:
    transport = X25519PrivateKey.generate()
    public = public_bytes(transport)
    keys = ChildKeys(b"\x01" * 36, b"\x02" * 36, b"", b"")
    opener = ChildKeyOpener(transport, size=2)
    stranger = public_bytes(X25519PrivateKey.generate())
    with pytest.raises(SealError):
        opener.open(stranger, b"\x00" * 40, SPI_IN, SPI_OUT)
    assert "0 channels" in repr(opener)
    for _ in range(3):
        ephemeral, blob = ChildKeySealer().seal(public, SPI_IN, SPI_OUT, keys, now=0.0)
        assert opener.open(ephemeral, blob, SPI_IN, SPI_OUT) == keys
    assert "2 channels" in repr(opener)  # the oldest went


@settings(max_examples=200, deadline=None)
@given(plain=st.binary(max_size=300))
def test_any_opened_plaintext_unpacks_or_raises_seal_error(plain: bytes) -> None:
    """A peer holding the public key can seal anything: its layout is checked like wire data."""
    transport = X25519PrivateKey.generate()
    channel, ephemeral = SealedChannel.open_to(
        public_bytes(transport), b"ikefarm kernel channel v1"
    )
    sealed = channel.seal(b"child-keys" + SPI_IN + SPI_OUT, plain)
    try:
        keys = open_child_keys(transport, ephemeral, sealed, SPI_IN, SPI_OUT)
    except SealError:
        return
    assert sum(2 + len(k) for k in dataclasses.astuple(keys)) == len(plain)


async def test_sealed_install_is_opened_for_the_backend(
    kernel: Runtime, nats_client: Client
) -> None:
    public = await transport_key(nats_client)
    assert len(public) == 32
    ephemeral, sealed = seal_child_keys(public, SPI_IN, SPI_OUT, CHILD_KEYS)
    request = dataclasses.replace(child(), ephemeral=ephemeral, sealed_keys=sealed)
    assert await send_install(nats_client, envelope.pack(request)) == KernelAck(ok=True)
    assert kernel.service is not None
    backend = kernel.service.backend  # type: ignore[attr-defined]
    lengths = {sa.direction: sa.encr_key_length for sa in backend.sad.values()}
    assert lengths == {"in": 36, "out": 36}
    assert "transport" not in repr(kernel.service) and public.hex() not in repr(kernel.service)


async def test_keys_in_clear_are_refused(kernel: Runtime, nats_client: Client) -> None:
    clear = dataclasses.replace(child(), encr_key_in=b"\x01" * 36, encr_key_out=b"\x02" * 36)
    raw = await ask(nats_client, subjects.KERNEL_CHILD_INSTALL, envelope.pack(clear))
    with pytest.raises(BusError) as refused:
        envelope.unpack_reply(raw, KernelAck)
    assert refused.value.code == "bad_field" and "sealed" in refused.value.message
    assert kernel.counters["child_install.keys_in_clear"] == 1
    assert kernel.service is not None and kernel.service.gauges()["sas"] == 0


async def test_keys_sealed_to_another_key_or_child_are_refused(
    kernel: Runtime, nats_client: Client
) -> None:
    other = public_bytes(X25519PrivateKey.generate())  # e.g. before a kernel restart
    ephemeral, sealed = seal_child_keys(other, SPI_IN, SPI_OUT, CHILD_KEYS)
    request = dataclasses.replace(child(), ephemeral=ephemeral, sealed_keys=sealed)
    refused = KernelAck(ok=False, error=SEALED_KEYS_REFUSED)
    assert await send_install(nats_client, envelope.pack(request)) == refused

    public = await transport_key(nats_client)
    ephemeral, sealed = seal_child_keys(public, SPI_IN, SPI_OUT, CHILD_KEYS)
    moved = dataclasses.replace(child(spi_in="c0000009"), ephemeral=ephemeral, sealed_keys=sealed)
    assert await send_install(nats_client, envelope.pack(moved)) == refused
    unsealed = child()  # neither keys nor seal
    assert await send_install(nats_client, envelope.pack(unsealed)) == refused
    assert kernel.counters["child_install.sealed_keys"] == 3
    assert kernel.service is not None and kernel.service.gauges()["sas"] == 0


def test_only_ike_may_ask_and_only_kernel_may_answer_for_the_transport_key() -> None:
    subject = subjects.KERNEL_TRANSPORT_KEY
    for user in subjects.PERMISSIONS:
        perms = subjects.permissions(user)
        asks = any(nats_match(p, subject) for p in perms["publish"])
        answers = any(nats_match(p, subject) for p in perms["subscribe"])
        assert asks == (user == "ike"), user
        assert answers == (user == "kernel"), user
