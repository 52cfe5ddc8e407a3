"""The keystore's secrets at rest and its PPK endpoint, over a real nats-server.

The store is sealed with the master key: restarting with the right key keeps
every secret, a wrong or missing key refuses to start and leaves the file as it
was. PPK mixing (RFC 8784 3) is sealed both ways; a request for a secret itself
is refused with a structured error, and malformed requests are counted.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import envelope, subjects
from ikefarm.proto.envelope import BusError
from ikefarm.proto.messages import (
    PpkMixReply,
    PpkMixRequest,
    PskAuthReply,
    PskAuthRequest,
    SecretRequest,
    TransportKeyReply,
    TransportKeyRequest,
)
from ikefarm.services.keystore.service import KeystoreService, KeystoreUnavailable, load_store
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.bus.sealed import REPLY, REQUEST, SealedChannel
from ikefarm.shared.config.loader import Config, parse_config
from ikefarm.shared.ikev2.constants import PrfId
from ikefarm.shared.observability.logging import configure_logging
from tests.leaks import assert_no_secret

PSK = b"psk-at-rest-0123456789"
PPK = bytes.fromhex("9f3a61c2d87e05b4aa10c3e5f6172839")
PPK_ID = b"ppk-one"
SECRETS = (PSK, PPK)

CONFIG = f"""
[[ike.pre-shared-key]]
local-id = "gw.example"
remote-id = "peer.example"
secret = "{PSK.decode()}"

[[ike.ppk]]
name = "one"
id = "{PPK_ID.decode()}"
secret = "0x{PPK.hex()}"

[[ike.ppk]]
name = "two"
id-hex = "070078f342ee0a"
secret = "another-ppk-secret-value"

[keystore]
store-file = "{{store}}"
{{keystore_extra}}
"""


def keystore_config(tmp_path: Path, keystore_extra: str = "") -> Config:
    store = tmp_path / "state" / "keystore.bin"
    return parse_config(CONFIG.format(store=store, keystore_extra=keystore_extra))


def prf_plus_sha256(key: bytes, seed: bytes, length: int) -> bytes:
    """RFC 7296 2.13 prf+ with HMAC-SHA-256, written out independently of ikefarm."""
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(key, block + seed + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(
        "keystore", "keystore-0", {"daemon": {"default": 3}, "authpriv": {"default": 3}}, stream
    )
    yield stream
    configure_logging("keystore", "keystore-0", {"daemon": {"default": "disable"}})


async def start(config: Config, url: str) -> Runtime:
    runtime = Runtime(KeystoreService, config, url, instance="keystore-0")
    await runtime.start()
    return runtime


@pytest.fixture
async def client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


async def ask(nc: Client, subject: str, payload: bytes) -> bytes:
    raw = (await nc.request(subject, payload, timeout=2)).data
    assert_no_secret(raw, SECRETS)
    return raw


async def mix(nc: Client, keys: bytes, ppk_id: bytes = PPK_ID) -> tuple[bool, bytes]:
    public = envelope.unpack_reply(
        await ask(nc, subjects.KEYSTORE_TRANSPORT_KEY, envelope.pack(TransportKeyRequest())),
        TransportKeyReply,
    ).public_key
    channel, ephemeral = SealedChannel.open_to(public)
    request = PpkMixRequest(
        int(PrfId.HMAC_SHA2_256), ppk_id, ephemeral, channel.seal(REQUEST, keys)
    )
    raw = await ask(nc, subjects.KEYSTORE_PPK_MIX, envelope.pack(request))
    assert keys not in raw  # the SK_* travel sealed both ways
    reply = envelope.unpack_reply(raw, PpkMixReply)
    return reply.found, channel.open(REPLY, reply.sealed_keys) if reply.found else b""


async def test_restart_with_the_right_key_keeps_every_secret(
    nats_server: EmbeddedNats, client: Client, tmp_path: Path, log_stream: io.StringIO
) -> None:
    config = keystore_config(tmp_path)
    runtime = await start(config, nats_server.url)
    first_public = (
        await client.request(
            subjects.KEYSTORE_TRANSPORT_KEY, envelope.pack(TransportKeyRequest()), timeout=2
        )
    ).data
    await runtime.stop()
    store = tmp_path / "state" / "keystore.bin"
    sealed = store.read_bytes()
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    assert_no_secret(sealed, SECRETS)

    runtime = await start(config, nats_server.url)
    try:
        assert store.read_bytes() == sealed  # nothing changed: not even rewritten
        again = (
            await client.request(
                subjects.KEYSTORE_TRANSPORT_KEY, envelope.pack(TransportKeyRequest()), timeout=2
            )
        ).data
        assert again == first_public  # the generated transport key came back from the store
        sk = os.urandom(96)
        found, mixed = await mix(client, sk)
        assert found
        assert mixed == b"".join(prf_plus_sha256(PPK, sk[i : i + 32], 32) for i in (0, 32, 64))
        key = hmac.new(PSK, b"Key Pad for IKEv2", hashlib.sha256).digest()
        verify = hmac.new(key, b"theirs", hashlib.sha256).digest()
        psk_request = PskAuthRequest(5, "gw.example", "peer.example", b"theirs", verify, b"ours")
        raw = await ask(client, subjects.KEYSTORE_PSK_AUTH, envelope.pack(psk_request))
        assert envelope.unpack_reply(raw, PskAuthReply).verified
        assert runtime.service is not None
        gauges = runtime.service.gauges()
        assert (gauges["psk_entries"], gauges["ppk_entries"]) == (1, 2)
    finally:
        await runtime.stop()
    assert_no_secret(log_stream.getvalue(), SECRETS)


async def test_wrong_or_missing_master_key_refuses_and_leaves_the_file(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = keystore_config(tmp_path)
    runtime = await start(config, nats_server.url)
    await runtime.stop()
    store = tmp_path / "state" / "keystore.bin"
    before = (store.read_bytes(), store.stat().st_mtime_ns)

    monkeypatch.setenv("IKEFARM_MASTER_KEY", "0x" + "ab" * 32)
    with pytest.raises(KeystoreUnavailable, match="wrong master key") as wrong:
        KeystoreService.preflight(config)
    assert "abab" not in str(wrong.value)
    monkeypatch.delenv("IKEFARM_MASTER_KEY")
    with pytest.raises(KeystoreUnavailable, match=r"no master key.*IKEFARM_MASTER_KEY"):
        KeystoreService.preflight(config)
    monkeypatch.setenv("IKEFARM_MASTER_KEY", "short")
    with pytest.raises(KeystoreUnavailable, match="at least 16"):
        KeystoreService.preflight(config)
    missing_file = keystore_config(tmp_path, f'master-key-file = "{tmp_path / "nope.key"}"')
    with pytest.raises(KeystoreUnavailable, match="cannot read the master key file"):
        KeystoreService.preflight(missing_file)
    assert (store.read_bytes(), store.stat().st_mtime_ns) == before


def test_the_processes_say_why_and_exit_1(tmp_path: Path) -> None:
    config_path = tmp_path / "ikefarm.toml"
    store = tmp_path / "state" / "keystore.bin"
    config_path.write_text(CONFIG.format(store=store, keystore_extra=""))
    argv = [sys.executable, "-m", "ikefarm.shared.cli.main"]
    # `ikefarm up` checks every service before it starts anything: no broker, no restart loop
    no_key = {k: v for k, v in os.environ.items() if k != "IKEFARM_MASTER_KEY"}
    result = subprocess.run(
        [*argv, "up", "-c", str(config_path)],
        env=no_key,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "keystore: keystore locked: no master key" in result.stderr
    load_store(parse_config(config_path.read_text()))  # made with the test key
    before = store.read_bytes()
    wrong = dict(os.environ, IKEFARM_MASTER_KEY="0x" + "cd" * 32)
    result = subprocess.run(
        [*argv, "service", "keystore", "-c", str(config_path), "--nats", "nats://127.0.0.1:1"],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "wrong master key" in result.stderr and "cdcd" not in result.stderr
    assert store.read_bytes() == before


async def test_master_key_from_a_file(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text("0s" + "bWFzdGVyLWtleS1mcm9tLWEtZmlsZS0wMTIz" + "\n")
    config = keystore_config(tmp_path, f'master-key-file = "{key_file}"')
    # readable by group or others: refused in ssh's words, whatever the key
    for mode in (0o644, 0o640, 0o604):
        key_file.chmod(mode)
        with pytest.raises(KeystoreUnavailable) as too_open:
            KeystoreService.preflight(config)
        assert str(too_open.value) == (
            f"keystore locked: permissions {mode:04o} for {key_file} are too open; "
            "it must be readable by its owner only (chmod 600)"
        )
    key_file.chmod(0o600)
    runtime = await start(config, nats_server.url)
    await runtime.stop()
    # the environment's key is not the file's: the file wins, the env key cannot open it
    env_only = keystore_config(tmp_path)
    with pytest.raises(KeystoreUnavailable, match="wrong master key"):
        KeystoreService.preflight(env_only)
    KeystoreService.preflight(config)


async def test_unknown_ppk_id_is_no_ppk(
    nats_server: EmbeddedNats, client: Client, tmp_path: Path
) -> None:
    runtime = await start(keystore_config(tmp_path), nats_server.url)
    try:
        assert await mix(client, os.urandom(96), ppk_id=b"unknown") == (False, b"")
        found, _ = await mix(client, os.urandom(96), ppk_id=bytes.fromhex("070078f342ee0a"))
        assert found
        assert runtime.counters["ppk_mix.no_ppk"] == 1 and runtime.counters["ppk_mix.mixed"] == 1
    finally:
        await runtime.stop()


@pytest.mark.parametrize(
    ("kind", "name"), [("ppk", "one"), ("psk", "ike.pre-shared-key[0]"), ("private-key", "gw")]
)
async def test_a_request_for_a_secret_is_refused(
    nats_server: EmbeddedNats, client: Client, tmp_path: Path, kind: str, name: str
) -> None:
    runtime = await start(keystore_config(tmp_path), nats_server.url)
    try:
        raw = await ask(client, subjects.KEYSTORE_SECRET, envelope.pack(SecretRequest(kind, name)))
        with pytest.raises(BusError) as refused:
            envelope.unpack_reply(raw)
        assert refused.value.code == "secret_refused"
        assert runtime.counters["secret_requests_refused"] == 1
        assert runtime.counters["bus_refused.secret_refused"] == 1
    finally:
        await runtime.stop()


@pytest.fixture
async def running(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Runtime]:
    runtime = await start(keystore_config(tmp_path), nats_server.url)
    yield runtime
    await runtime.stop()


async def test_malformed_ppk_requests_get_structured_errors(
    running: Runtime, client: Client
) -> None:
    good = envelope._to_wire(PpkMixRequest(5, PPK_ID, os.urandom(32), os.urandom(60)))

    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        field=st.sampled_from(sorted(good)),
        value=st.one_of(
            st.none(),
            st.integers(-(2**63), 2**64 - 1),
            st.binary(max_size=200),
            st.text(max_size=20),
        ),
        drop=st.booleans(),
    )
    def case(field: str, value: object, drop: bool) -> None:
        body = dict(good)
        if drop:
            del body[field]
        else:
            body[field] = value
        payload = msgpack.packb({"v": 1, "kind": "ppk-mix-request", "body": body})
        cases.append(payload)

    cases: list[bytes] = []
    case()
    before = sum(v for k, v in running.counters.items() if k.startswith("bus_refused."))
    for payload in cases:
        raw = await ask(client, subjects.KEYSTORE_PPK_MIX, payload)
        with pytest.raises(BusError) as refused:
            envelope.unpack_reply(raw)
        assert refused.value.code in {"bad_field", "missing_field"}
    after = sum(v for k, v in running.counters.items() if k.startswith("bus_refused."))
    assert after - before == len(cases)
    # still serving
    found, _ = await mix(client, os.urandom(96))
    assert found
