"""No secret on the bus or in the logs (levels 0-3) while strongSwan authenticates to ikefarm.

The secrets include the ESP keys of the child SAs: they go to the kernel
service sealed (shared/bus/child_keys.py) and must appear nowhere in clear.

A recorder subscribed to `>` on the gateway's broker captures every message
(subjects, headers, payloads) while strongSwan makes two IKE SAs with
`ikefarm up`: one with the PSK only, one with the PSK and a PPK (RFC 8784).
strongSwan, at log level 4, prints the IKE SA keys it derived (the same as
ikefarm's, SK_d', SK_pi', SK_pr' after the PPK): with the PSK and the PPK they
are the secrets searched for, raw, hex or base64, in the capture and in
ikefarm's log (every service at level 3, the most a production log carries
below the key-dumping level 4). Another kind of secret (a private key for
certificate authentication) is one more entry in `secrets`.

The farm's embedded broker admits no user that may read `>` (each service
only its own subjects), so the gateway here runs on an operator's open
nats-server in its namespace, which the recorder can read whole.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ikefarm.services.keystore.certs import private_key_der
from ikefarm.shared.bus.embedded import nats_server_binary
from tests.harness.bus_capture import BusCapture
from tests.harness.freeradius import FreeRadius
from tests.harness.gateway import Gateway, farm_config
from tests.harness.netns import NetnsPair
from tests.harness.strongswan import Child, Connection, Ppk, Psk, StrongSwan
from tests.interop.test_cert_strongswan import cert_vpn, strongswan_conn
from tests.leaks import find_secrets
from tests.pki import Pki

pytestmark = [pytest.mark.interop, pytest.mark.timeout(180)]

PSK = "leak-hunt-psk-6b2f09e4a1c7d358"
PPK = bytes.fromhex("a4c1e9077f3b52d86e10f4c2b9a75d13c8e2046f91ab37d5e6028c4f7b19a3e5")
PPK_ID = "leak-hunt-ppk"

# strongSwan's DBG4 dump of a derived key: "Sk_d secret => 48 bytes @ 0x..." then hex lines;
# a child SA's ESP keys: "encryption initiator key => 36 bytes @ 0x..." (chd at level 4)
_KEY_HEADER = re.compile(
    r"(Sk_\w+|SK_\w+|(?:encryption|integrity) (?:initiator|responder))"
    r"(?: secret| key) => (\d+) bytes"
)
_HEX_LINE = re.compile(r"(?:^|\s)\d+: ((?:[0-9A-F]{2} ){1,16})")  # "<c|1>   16: 3F AD ..."


def strongswan_keys(log: str) -> dict[str, list[bytes]]:
    """Every IKE SA key strongSwan logged at level 4, by name, in the order derived."""
    keys: dict[str, list[bytes]] = {}
    lines = log.splitlines()
    for index, line in enumerate(lines):
        header = _KEY_HEADER.search(line)
        if header is None:
            continue
        name, size = header.group(1).lower().replace(" ", "_"), int(header.group(2))
        octets = b""
        for follow in lines[index + 1 :]:
            dump = _HEX_LINE.search(follow)
            if dump is None:
                break
            octets += bytes.fromhex(dump.group(1).replace(" ", ""))
        if len(octets) == size and size:
            keys.setdefault(name, []).append(octets)
    return keys


def connection(name: str, identity: str, ppk: bool) -> Connection:
    return Connection(
        name=name,
        local_addrs="192.0.2.2",
        remote_addrs="192.0.2.1",
        local_id=identity,
        remote_id="gw.example",
        proposals="aes256gcm16-prfsha384-x25519",
        ppk_id=PPK_ID if ppk else None,
        ppk_required=True if ppk else None,
        children=[
            Child(
                name=f"{name}-net",
                local_ts="10.200.0.0/24",
                remote_ts="10.100.0.0/24",
                esp_proposals="aes256gcm16",
            )
        ],
    )


OPEN_NATS_PORT = 4222


@pytest.fixture
def open_nats(netns_pair: NetnsPair, tmp_path: Path) -> Iterator[str]:
    """A nats-server without authorization on the gateway namespace's loopback."""
    server = netns_pair.gw.popen(
        [
            nats_server_binary(),
            "-js",
            "--store_dir",
            str(tmp_path / "open-nats"),
            "--addr",
            "127.0.0.1",
            "--port",
            str(OPEN_NATS_PORT),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # no readiness probe: the services keep retrying the connection until it listens
    try:
        yield f"nats://127.0.0.1:{OPEN_NATS_PORT}"
    finally:
        server.terminate()
        server.wait(10)


def test_psk_and_ppk_handshakes_leak_no_secret(
    open_nats: str,
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    ppk_table = f'\n[[ike.ppk]]\nname = "p"\nid = "{PPK_ID}"\nsecret = "0x{PPK.hex()}"\n'
    ppk_table += f'\n[nats]\nurl = "{open_nats}"\n'
    gateway = gateway_factory(netns_pair.gw, psk=PSK, extra=ppk_table, log_level=3)
    capture = BusCapture(netns_pair.gw, gateway.workdir / "state", tmp_path / "bus.msgpack")
    capture.start()

    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    peer = strongswan_factory(netns_pair.peer, log_levels={"ike": 4, "chd": 4})
    peer.load(
        [connection("plain", "a.peer.example", False), connection("pq", "b.peer.example", True)],
        psks=[Psk(PSK, ["a.peer.example", "b.peer.example", "gw.example"])],
        ppks=[Ppk(PPK_ID, "0x" + PPK.hex())],
    )
    peer.initiate(child="plain-net", timeout=20)
    peer.initiate(child="pq-net", timeout=20)
    rows = {row["remote_id"]: row for row in gateway.wait_sas(2)}
    assert rows["b.peer.example"]["ppk_used"] and not rows["a.peer.example"]["ppk_used"]
    records = capture.stop()

    keys = strongswan_keys(peer.log_text())
    for name in ("sk_d", "sk_pi", "sk_pr", "sk_ei", "sk_er"):
        assert name in keys, f"strongSwan did not log {name}: {sorted(keys)}"
    # the ESP keys of both child SAs (AES-GCM: encryption keys with salt, no integrity key)
    for name in ("encryption_initiator", "encryption_responder"):
        assert len(keys.get(name, [])) == 2, f"strongSwan did not log {name}: {sorted(keys)}"
    derived = [key for values in keys.values() for key in values]
    assert len(keys["sk_d"]) >= 3  # two IKE SAs, and SK_d' after the PPK
    secrets = [PSK.encode(), PPK, *derived]

    subjects = {r["subject"] for r in records}
    assert "ikefarm.keystore.ppk.mix" in subjects and "ikefarm.keystore.psk.auth" in subjects
    # the child SA keys did cross the bus to the kernel service: sealed, found nowhere
    assert "ikefarm.kernel.transport-key" in subjects
    installs = [r for r in records if r["subject"] == "ikefarm.kernel.child.install"]
    assert len(installs) == 2
    assert find_secrets(capture.blob(), secrets) == []
    log = gateway.log_text()
    assert '"level": 3' in log or '"level": 2' in log  # the log was really this verbose
    assert find_secrets(log, secrets) == []
    show = gateway.show_text("details") + str(gateway.show())
    assert find_secrets(show, secrets) == []


def test_certificate_handshake_leaks_no_private_key(
    open_nats: str,
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    tmp_path: Path,
) -> None:
    """strongSwan authenticates with certificates (RFC 7427) while the bus is recorded: the
    gateway's private key (PKCS#8 DER, its raw scalar/exponent too) and the IKE SA keys
    appear neither on the bus nor in ikefarm's level-3 log."""
    pki = Pki(tmp_path / "pki", "ecdsa")
    gw, peer_cert = pki.issue("gw", dns="gw.example"), pki.issue("peer", dns="peer.example")
    vpn = cert_vpn("rw", gw, remote_id="peer.example", remote_address="any")
    text = farm_config(tmp_path, psks=[], vpns=[vpn], log_level=3)
    text += f'\n[ike.pki]\nca-certificates = ["{pki.ca_path}"]\ncrls = ["{pki.write_crl()}"]\n'
    text += f'\n[nats]\nurl = "{open_nats}"\n'
    gateway = gateway_factory(netns_pair.gw, config_text=text)
    capture = BusCapture(netns_pair.gw, tmp_path / "state", tmp_path / "bus.msgpack")
    capture.start()

    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    peer = strongswan_factory(netns_pair.peer, log_levels={"ike": 4})
    peer.load([strongswan_conn(peer_cert, pki.ca_path)], private_keys=[peer_cert.key_path])
    peer.initiate(child="net", timeout=20)
    (row,) = gateway.wait_sas(1)
    assert row["local_auth"] == "DIGITAL_SIGNATURE"
    capture.stop()

    private = gw.key.private_numbers().private_value  # type: ignore[union-attr]
    scalar = private.to_bytes((private.bit_length() + 7) // 8, "big")
    derived = [key for values in strongswan_keys(peer.log_text()).values() for key in values]
    secrets = [private_key_der(gw.key), scalar, *derived]
    assert derived, "strongSwan logged no IKE SA keys to search for"
    assert find_secrets(capture.blob(), secrets) == []
    assert find_secrets(gateway.log_text(), secrets) == []


# the AUTH computation after EAP dumps its shared key, the 64-octet MSK: "secret => 64 bytes"
_MSK_HEADER = re.compile(r"> secret => 64 bytes")


def test_eap_tls_through_radius_leaks_neither_the_radius_secret_nor_the_msk(
    open_nats: str,
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    freeradius_factory: Callable[..., FreeRadius],
    tmp_path: Path,
) -> None:
    """strongSwan authenticates by EAP-TLS through ikefarm to FreeRADIUS (docs/radius.md)
    while the bus is recorded: the RADIUS shared secret, the MSK (strongSwan logs it at
    level 4), the PSK and the IKE SA keys appear neither on the bus nor in the level-3 log."""
    from tests.harness.freeradius import TlsFiles
    from tests.interop.test_eap_radius_strongswan import (
        RADIUS_SECRET,
        SERVER,
        road_warrior,
    )

    pki = Pki(tmp_path / "pki", "rsa")
    radius_cert = pki.issue("radius", dns="gw.example")
    client = pki.issue("alice", dns="alice.peer.example")
    freeradius_factory(
        netns_pair.gw,
        users="",
        secret=RADIUS_SECRET,
        auth_port=18120,
        acct_port=18130,
        tls=TlsFiles(pki.ca_path, radius_cert.cert_path, radius_cert.key_path),
        default_eap="tls",
    )
    extra = SERVER.format(name="fr", port=18120, retries=1, secret=RADIUS_SECRET)
    extra += f'\n[nats]\nurl = "{open_nats}"\n'
    gateway = gateway_factory(netns_pair.gw, start=False, psk=PSK, extra=extra, log_level=3)
    text = gateway.config_path.read_text().replace(
        'ike-policy = { template = "ikepol" }\n',
        'ike-policy = { template = "ikepol", remote-auth-method = "eap-radius" }\n',
    )
    gateway.config_path.write_text('[kernel]\nbackend = "memory"\n' + text)
    gateway.start()
    capture = BusCapture(netns_pair.gw, gateway.workdir / "state", tmp_path / "bus.msgpack")
    capture.start()

    netns_pair.peer.add_address("lo", "10.200.0.1/32")
    from tests.harness.strongswan import DEFAULT_PLUGINS

    peer = strongswan_factory(
        netns_pair.peer,
        plugins=[*DEFAULT_PLUGINS, "eap-identity", "eap-tls"],
        log_levels={"ike": 4, "tls": 4},
    )
    conn = road_warrior(eap_id="alice.peer.example")
    conn.local_auth = "eap-tls"
    conn.local_certs = [client.cert_path]
    peer.load(
        [conn],
        psks=[Psk(PSK, ["alice.peer.example", "gw.example"])],
        private_keys=[client.key_path],
        cacerts=[pki.ca_path],
    )
    peer.initiate(child="c-net", timeout=40)
    gateway.wait_sas(1)
    records = capture.stop()

    log = peer.log_text()
    msk = b""
    lines = log.splitlines()
    for index, line in enumerate(lines):
        header = _MSK_HEADER.search(line)
        if header is None:
            continue
        for follow in lines[index + 1 :]:
            dump = _HEX_LINE.search(follow)
            if dump is None:
                break
            msk += bytes.fromhex(dump.group(1).replace(" ", ""))
        break
    assert len(msk) == 64, "strongSwan did not log the MSK to search for"
    derived = [key for values in strongswan_keys(log).values() for key in values]
    secrets = [RADIUS_SECRET.encode(), msk, msk[:32], msk[32:], PSK.encode(), *derived]
    subjects = {r["subject"] for r in records}
    assert "ikefarm.keystore.eap.relay" in subjects and "ikefarm.keystore.eap.auth" in subjects
    assert find_secrets(capture.blob(), secrets) == []
    assert find_secrets(gateway.log_text(), secrets) == []
