"""Packets through the tunnel: strongSwan (kernel-libipsec) <-> ikefarm's userspace dataplane.

strongSwan 5.9.8 initiates from "peer" (192.0.2.2 or 2001:db8::2, inner
10.200.0.1 on lo) to `ikefarm up` in "gw" (192.0.2.1 or 2001:db8::1, inner
10.100.0.1 on lo) with
`[kernel] backend = "userspace"`. This kernel has no ESP states, so both ends
protect packets in userspace: strongSwan through kernel-libipsec (its TUN
device `ipsec0`; it forces ESP in UDP on port 4500, faking a NAT), ikefarm
through its TUN device `ikefarm0` and a raw socket reading ESP-in-UDP next to
ingress's IKE socket on 4500 (docs/esp-dataplane.md).

Acceptance: ping both ways through the tunnel, then a TCP transfer each way
whose SHA-256 matches on both ends, and the SA counters of `ikefarm show
kernel` say the packets went through the dataplane.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest

from tests.harness.gateway import Gateway
from tests.harness.netns import Namespace, NetnsPair, wait_for
from tests.harness.strongswan import StrongSwan
from tests.interop.test_responder_strongswan import peer_connection, psk_for

pytestmark = [pytest.mark.interop, pytest.mark.timeout(240)]

PSK = "userspace-esp-psk-5d0c7a91e3b2"
GW_INNER, PEER_INNER = "10.100.0.1", "10.200.0.1"
TRANSFER_BYTES = 20 * 1024 * 1024
PORT = 5201

# A TCP endpoint: the server sends or sinks TRANSFER_BYTES, printing the SHA-256 of what it
# sent or received; the data is a seeded pseudo-random stream so both ends can check it.
SERVER = r"""
import hashlib, random, socket, sys, time
mode, address, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pause = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0  # s between 64 KiB writes
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((address, port))
listener.listen(1)
print("listening", flush=True)
conn, _ = listener.accept()
digest = hashlib.sha256()
if mode == "send":
    data = random.Random(7).randbytes(size)
    for start in range(0, size, 65536):
        conn.sendall(data[start : start + 65536])
        time.sleep(pause)
    digest.update(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""

CLIENT = r"""
import hashlib, random, socket, sys
mode, address, port, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
conn = socket.create_connection((address, port), timeout=60)
digest = hashlib.sha256()
if mode == "send":
    data = random.Random(11).randbytes(size)
    conn.sendall(data)
    digest.update(data)
    conn.shutdown(socket.SHUT_WR)
    conn.recv(1)
else:
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        total += len(chunk)
        digest.update(chunk)
print(digest.hexdigest(), flush=True)
"""


def transfer(
    server_ns: Namespace,
    client_ns: Namespace,
    server_address: str,
    *,
    upload: bool,
    pause: float = 0.0,
) -> tuple[str, str]:
    """(server's digest, client's digest) of TRANSFER_BYTES sent by the client when `upload`;
    a downloading server pauses `pause` s after each 64 KiB (a transfer that lasts)."""
    server_mode, client_mode = ("sink", "send") if upload else ("send", "sink")
    args = [server_address, str(PORT), str(TRANSFER_BYTES)]
    server = server_ns.popen(
        [sys.executable, "-c", SERVER, server_mode, *args, str(pause)],
        stdout=-1,
        stderr=-1,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    client = client_ns.run([sys.executable, "-c", CLIENT, client_mode, *args], timeout=150)
    out, err = server.communicate(timeout=30)
    assert server.returncode == 0, err
    return out.strip(), client.stdout.strip()


def expected_digest(seed: int) -> str:
    return hashlib.sha256(random.Random(seed).randbytes(TRANSFER_BYTES)).hexdigest()


def kernel_state(gateway: Gateway) -> dict[str, object]:
    result = gateway.run_cli("show", "kernel", "--json")
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


@dataclass
class Tunnel:
    gateway: Gateway
    peer: StrongSwan
    gw_ns: Namespace
    peer_ns: Namespace
    child: dict[str, Any]


# outer (IKE and ESP) addresses of gw and peer by IP version; the inner ones stay IPv4
OUTER = {4: ("192.0.2.1", "192.0.2.2"), 6: ("2001:db8::1", "2001:db8::2")}


@pytest.fixture
def outer(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(gw, peer) outer addresses: IPv4 unless a test asks `indirect` for 6."""
    return OUTER[getattr(request, "param", 4)]


# strongSwan ESP proposal -> the esp-proposal ikefarm adds in front of its usual ones
SUITES = {
    "aes256gcm16": "",
    "aes128-sha256": "",  # AES-CBC with HMAC-SHA-256: among the gateway's usual proposals
    "chacha20poly1305": (
        '[[ike.ipsec-policy-template.esp-proposal]]\naead-alg = ["chacha20-poly1305"]\n'
        "esn = [false]\n"
    ),
}


@pytest.fixture
def esp(request: pytest.FixtureRequest) -> str:
    """strongSwan's ESP proposal: AES-GCM-256 unless a test asks `indirect` for another."""
    return str(getattr(request, "param", "aes256gcm16"))


@pytest.fixture
def backend() -> str:
    """`[kernel] backend`: userspace unless a test parametrizes `backend`."""
    return "userspace"


def establish(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    *,
    outer: tuple[str, str] = ("192.0.2.1", "192.0.2.2"),
    esp: str = "aes256gcm16",
    extra: str = '\n[kernel]\nbackend = "userspace"\n',
    **gateway_options: Any,
) -> Tunnel:
    """strongSwan's child SA to an ikefarm gateway (`extra` names its kernel backend and
    anything else the test needs), installed on both ends, no packet sent yet."""
    gw_ns, peer_ns = netns_pair.gw, netns_pair.peer
    gw_ns.add_address("lo", f"{GW_INNER}/32")
    peer_ns.add_address("lo", f"{PEER_INNER}/32")
    gateway = gateway_factory(
        gw_ns,
        psk=PSK,
        address=outer[0],
        extra=extra,
        ipsec_template_extra=SUITES[esp],
        log_level=1,
        **gateway_options,
    )
    peer = strongswan_factory(peer_ns)
    # strongSwan's side as in the responder tests: child c-net, 10.200.0.0/24 === 10.100.0.0/24
    connection = replace(peer_connection(esp=esp), local_addrs=outer[1], remote_addrs=outer[0])
    peer.load([connection], psks=[psk_for("a.peer.example", secret=PSK)])
    peer.initiate(child="c-net", timeout=20)
    (sa,) = peer.list_sas()
    (child,) = sa["child-sas"]
    assert child["encap"] == "yes"  # kernel-libipsec: ESP in UDP on 4500
    (row,) = gateway.wait_sas(1)
    assert row["children"][0]["state"] == "installed"
    return Tunnel(gateway, peer, gw_ns, peer_ns, child)


@pytest.fixture
def tunnel(
    netns_pair: NetnsPair,
    gateway_factory: Callable[..., Gateway],
    strongswan_factory: Callable[..., StrongSwan],
    outer: tuple[str, str],
    esp: str,
    backend: str,
) -> Tunnel:
    """strongSwan's child SA to ikefarm, installed on both ends, no packet sent yet."""
    return establish(
        netns_pair,
        gateway_factory,
        strongswan_factory,
        outer=outer,
        esp=esp,
        extra=f'\n[kernel]\nbackend = "{backend}"\n',
    )


@pytest.mark.parametrize("outer", [4, 6], indirect=True, ids=["outer-ipv4", "outer-ipv6"])
def test_ping_and_tcp_through_the_userspace_dataplane(
    tunnel: Tunnel, outer: tuple[str, str]
) -> None:
    gateway, child, gw_ns, peer_ns = tunnel.gateway, tunnel.child, tunnel.gw_ns, tunnel.peer_ns
    # the route to the remote selector is in table 220, reached by a rule; main is untouched
    assert "10.200.0.0/24 dev ikefarm0" in gw_ns.run(["ip", "route", "show", "table", "220"]).stdout
    assert "ikefarm0" not in gw_ns.run(["ip", "route", "show"]).stdout
    assert "220:\tfrom all lookup 220" in gw_ns.run(["ip", "rule"]).stdout
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert gw_ns.ping(PEER_INNER, src=GW_INNER, count=3, timeout=10)

    state = kernel_state(gateway)
    assert state["backend"] == "userspace"
    sas = {sa_row["direction"]: sa_row for sa_row in state["sas"]}  # type: ignore[attr-defined]
    assert sas["in"]["spi"] == child["spi-out"] and sas["out"]["spi"] == child["spi-in"]
    assert sas["in"]["packets"] >= 6 and sas["out"]["packets"] >= 6  # echo requests + replies
    assert sas["in"]["encap"] is True
    text = gateway.run_cli("show", "kernel").stdout
    block = text.split(f"sa spi {child['spi-out']} direction in\n", 1)[1].split("    ..")[0]
    assert f"    source {outer[1]}\n    destination {outer[0]}\n" in block
    assert f"    bytes {sas['in']['bytes']}\n    packets {sas['in']['packets']}\n" in block

    # upload: peer -> gw, then download: gw -> peer
    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=True)
    assert server_digest == client_digest == expected_digest(11)
    server_digest, client_digest = transfer(gw_ns, peer_ns, GW_INNER, upload=False)
    assert server_digest == client_digest == expected_digest(7)

    # ingress's NAT-T socket filter kept every ESP packet away from it
    assert gateway.counters("ingress").get("esp_in_udp", 0) == 0
    counters = gateway.counters("kernel")
    assert counters.get("esp.in.packets", 0) > 2 * TRANSFER_BYTES // 1500 // 2
    assert counters.get("esp.in.drop.integrity", 0) == 0
    wait_for(
        lambda: gateway.counters("kernel").get("child_install.ok") == 1,
        timeout=5,
        what="one install",
    )


# Run in the peer namespace: the UDP payload of the first ESP-in-UDP packet strongSwan sends
# to the gateway's NAT-T port, read from the veth with a packet socket (ETH_P_ALL: only those
# see outgoing packets).
CAPTURE = r"""
import socket, struct, sys
sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0003))  # ETH_P_ALL
sock.bind((sys.argv[1], 0))
sock.settimeout(20)
print("capturing", flush=True)
while True:
    data = sock.recv(65535)
    if len(data) < 28 or data[0] >> 4 != 4:
        continue
    ihl = (data[0] & 0x0F) * 4
    if data[9] != 17 or data[16:20] != socket.inet_aton("192.0.2.1"):
        continue
    dport, length = struct.unpack("!2xH H", data[ihl : ihl + 6])
    payload = data[ihl + 8 : ihl + length]
    if dport == 4500 and len(payload) >= 8 and payload[:4] != bytes(4):
        print(payload.hex(), flush=True)
        break
"""

SEND = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for line in sys.stdin.read().split():
    sock.sendto(bytes.fromhex(line) if line != "-" else b"", ("192.0.2.1", 4500))
"""


def test_replayed_forged_and_malformed_esp_is_dropped_and_counted(tunnel: Tunnel) -> None:
    """On the wire: a replayed packet (replay), one with a later sequence number and the
    old ICV (integrity), junk with the real SPI and unknown SPIs; none reaches the TUN
    device, each is counted by reason, and the tunnel still carries traffic."""
    gateway, gw_ns, peer_ns = tunnel.gateway, tunnel.gw_ns, tunnel.peer_ns
    ifname = tunnel.peer_ns.run(["ip", "-o", "link", "show", "type", "veth"]).stdout
    ifname = ifname.split(":")[1].strip().split("@")[0]
    capture = peer_ns.popen(
        [sys.executable, "-c", CAPTURE, ifname], stdout=-1, stderr=-1, text=True
    )
    assert capture.stdout is not None
    assert capture.stdout.readline().strip() == "capturing"
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=1, timeout=10)
    out, err = capture.communicate(timeout=25)
    assert out.strip(), err
    genuine = bytes.fromhex(out.strip())
    spi = genuine[:4]
    assert spi.hex() == tunnel.child["spi-out"]

    before = gateway.counters("kernel")
    seq = int.from_bytes(genuine[4:8], "big")
    forged = spi + (seq + 1000).to_bytes(4, "big") + genuine[8:]  # ICV no longer matches
    junk = [
        genuine,  # replayed
        forged,
        spi + bytes(4) + genuine[8:],  # sequence number 0 is never sent (RFC 4303 3.3.3)
        spi + (seq + 2000).to_bytes(4, "big") + b"\x00" * 5,  # too short for IV and ICV
        bytes.fromhex("0badc0de") + genuine[4:],  # unknown SPI
        bytes.fromhex("0badc0df") + bytes(100),
    ]
    peer_ns.run([sys.executable, "-c", SEND], input=" ".join(j.hex() for j in junk))

    def dropped() -> dict[str, int] | None:
        now = gateway.counters("kernel")
        delta = {
            key.removeprefix("esp.in.drop."): now.get(key, 0) - before.get(key, 0)
            for key in now
            if key.startswith("esp.in.drop.")
        }
        return delta if sum(delta.values()) >= len(junk) else None

    delta = wait_for(dropped, timeout=10, what="the forged packets dropped")
    assert delta["replay"] == 2  # the replay, and sequence number 0
    assert delta["integrity"] == 1
    assert delta["too_short"] == 1
    assert delta["unknown_spi"] == 2
    after = gateway.counters("kernel")
    assert after.get("esp.in.packets") == before.get("esp.in.packets")  # nothing to the TUN
    # the window did not move for the forgery: the tunnel goes on
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=2, timeout=10)
    assert gw_ns.ping(PEER_INNER, src=GW_INNER, count=1, timeout=10)

    # then a fuzzed burst on the wire: mutations of the genuine packet (a flipped octet,
    # cut short, bytes appended) and random junk behind the real SPI; seeded, reproducible
    pids = gateway.service_pids()
    rng = random.Random(1303)
    burst = []
    for _ in range(300):
        mutated = bytearray(genuine)
        kind = rng.randrange(3)
        if kind == 0:
            mutated[rng.randrange(len(mutated))] ^= rng.randrange(1, 256)
        elif kind == 1:
            del mutated[rng.randrange(8, len(mutated)) :]
        else:
            mutated = bytearray(spi + rng.randbytes(rng.randrange(4, 200)))
        burst.append(bytes(mutated))
    before = gateway.counters("kernel")
    peer_ns.run([sys.executable, "-c", SEND], input=" ".join(b.hex() for b in burst))
    wait_for(
        lambda: (
            sum(
                v - before.get(k, 0)
                for k, v in gateway.counters("kernel").items()
                if k.startswith("esp.in.drop.")
            )
            >= len(burst) - 5
        ),  # a datagram may be lost on the way; none may be delivered
        timeout=15,
        what="the fuzzed burst dropped",
    )
    after = gateway.counters("kernel")
    assert after.get("esp.in.packets") == before.get("esp.in.packets")
    assert gateway.service_pids() == pids  # no service crashed and restarted
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=2, timeout=10)


def test_child_rekey_in_the_middle_of_a_transfer(tunnel: Tunnel) -> None:
    """strongSwan rekeys the child while 20 MB flow to it: the transfer completes intact
    (TCP recovers whatever the switch cost), the new SAs carry the rest, the old are gone."""
    gateway, peer, gw_ns, peer_ns = tunnel.gateway, tunnel.peer, tunnel.gw_ns, tunnel.peer_ns
    old = {tunnel.child["spi-in"], tunnel.child["spi-out"]}
    result: dict[str, tuple[str, str]] = {}
    flow = threading.Thread(
        target=lambda: result.setdefault(
            "digests", transfer(gw_ns, peer_ns, GW_INNER, upload=False, pause=0.025)
        )
    )
    flow.start()  # 320 writes 25 ms apart: the transfer lasts 8 s or more
    try:
        wait_for(
            lambda: gateway.counters("kernel").get("esp.out.packets", 0) > 100,
            timeout=60,
            what="the transfer under way",
        )
        peer.rekey(child="c-net")

        def rekeyed() -> dict[str, Any] | None:
            sas = peer.list_sas()
            children = sas[0]["child-sas"] if sas else []
            installed = [c for c in children if c["state"] == "INSTALLED"]
            if len(installed) == 1 and {installed[0]["spi-in"], installed[0]["spi-out"]} != old:
                return installed[0]
            return None

        new = wait_for(rekeyed, timeout=30, what="strongSwan's child rekeyed")
    finally:
        flow.join(timeout=180)
    assert result["digests"] == (expected_digest(7), expected_digest(7))

    def only_new_sas() -> dict[str, dict[str, Any]] | None:
        rows = kernel_state(gateway)["sas"]
        by_direction = {row["direction"]: row for row in rows}  # type: ignore[attr-defined]
        return by_direction if len(rows) == 2 else None  # type: ignore[arg-type]

    sas = wait_for(only_new_sas, timeout=15, what="the old SAs deleted at ikefarm")
    assert sas["in"]["spi"] == new["spi-out"] and sas["out"]["spi"] == new["spi-in"]
    assert not {sas["in"]["spi"], sas["out"]["spi"]} & old
    assert (sas["out"]["packets"], sas["in"]["packets"]) > (1000, 0), sas  # the rest: on the new
    assert peer_ns.ping(GW_INNER, src=PEER_INNER, count=2, timeout=10)


@pytest.mark.parametrize("esp", ["aes128-sha256", "chacha20poly1305"], indirect=True)
def test_cbc_hmac_and_chacha20_poly1305_carry_traffic(tunnel: Tunnel, esp: str) -> None:
    """The other two ESP families of the codec against strongSwan's implementation."""
    encr = {"aes128-sha256": "AES_CBC", "chacha20poly1305": "CHACHA20_POLY1305"}[esp]
    assert tunnel.child["encr-alg"] == encr
    assert tunnel.peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert tunnel.gw_ns.ping(PEER_INNER, src=GW_INNER, count=3, timeout=10)
    state = kernel_state(tunnel.gateway)
    sas = {row["direction"]: row for row in state["sas"]}  # type: ignore[attr-defined]
    assert sas["in"]["packets"] >= 6 and sas["out"]["packets"] >= 6


@pytest.mark.parametrize("outer", [4, 6], indirect=True, ids=["outer-ipv4", "outer-ipv6"])
@pytest.mark.parametrize("backend", ["auto"])
def test_auto_resolves_to_userspace_without_udp_encap_on_the_natt_socket(
    tunnel: Tunnel, outer: tuple[str, str]
) -> None:
    """With `auto` ingress asks the kernel service what it became and leaves UDP_ENCAP off
    its NAT-T socket for the userspace dataplane, the steering filter on
    (docs/kernel-netlink.md, "The IKE sockets"): the dataplane gets every ESP-in-UDP
    packet, ingress none, and the kernel answers none with an ICMP error."""
    ingress = tunnel.gateway.status()["ingress"]
    assert all(row["gauges"]["kernel_backend"] == "userspace" for row in ingress)
    assert all(row["gauges"]["natt_udp_encap"] is False for row in ingress)
    assert kernel_state(tunnel.gateway)["backend"] == "userspace"
    assert tunnel.peer_ns.ping(GW_INNER, src=PEER_INNER, count=3, timeout=10)
    assert tunnel.gw_ns.ping(PEER_INNER, src=GW_INNER, count=3, timeout=10)
    state = kernel_state(tunnel.gateway)
    sas = {row["direction"]: row for row in state["sas"]}  # type: ignore[attr-defined]
    assert sas["in"]["packets"] >= 6 and sas["out"]["packets"] >= 6
    assert tunnel.gateway.counters("ingress").get("esp_in_udp", 0) == 0
