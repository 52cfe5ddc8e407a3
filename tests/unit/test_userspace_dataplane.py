"""The userspace dataplane's packet paths (services/kernel/dataplane.py), without I/O.

Two `Dataplane`s stand for the two gateways: what one's `outbound` makes, the
other's `inbound` takes. Selection by longest prefix and newest SA (a rekey),
the inbound selector check (RFC 4301 5.2), drops counted by reason (replay,
broken ICV, unknown SPI, policy), lifetimes reported, and ESN across 2^32.
"""

from __future__ import annotations

import ipaddress
import os

import pytest
from scapy.compat import raw
from scapy.layers.inet import ICMP, IP

from ikefarm.services.kernel.dataplane import Dataplane, Tunnel, selector_networks
from ikefarm.shared.esp import EspTransform, InboundSa, Lifetime, LifetimeEvent, OutboundSa

GCM = EspTransform.from_names("aes256-gcm-128")


def packet(src: str, dst: str, seq: int = 1) -> bytes:
    return raw(IP(src=src, dst=dst) / ICMP(id=3, seq=seq) / b"through the tunnel")


def tunnel_pair(
    unique_id: int,
    local_ts: str,
    remote_ts: str,
    *,
    spi: int = 0xC0000000,
    esn: bool = False,
    seq: int = 0,
    highest_seq: int = 0,
    lifetime: Lifetime | None = None,
    transform: EspTransform = GCM,
) -> tuple[Tunnel, Tunnel]:
    """(ours, the peer's) for one child: our outbound SA is the peer's inbound and back."""
    keys = [os.urandom(transform.encr_key_size) for _ in range(2)]
    integ = [os.urandom(transform.integ_key_size) for _ in range(2)]
    spi_ours, spi_peer = spi + unique_id, spi + 0x1000 + unique_id

    def sides(
        out_spi: int, in_spi: int, out_key: int, in_key: int, local: str, remote: str
    ) -> Tunnel:
        return Tunnel(
            unique_id=unique_id,
            outbound=OutboundSa(
                out_spi, transform, keys[out_key], integ[out_key], esn=esn, seq=seq,
                lifetime=lifetime,
            ),
            inbound=InboundSa(
                in_spi, transform, keys[in_key], integ[in_key], esn=esn, replay_window=64,
                highest_seq=highest_seq, lifetime=lifetime,
            ),
            local_address="192.0.2.1" if local == local_ts else "192.0.2.2",
            remote_address="192.0.2.2" if local == local_ts else "192.0.2.1",
            local_port=4500,
            remote_port=4500,
            udp_encap=True,
            local_nets=selector_networks(local),
            remote_nets=selector_networks(remote),
        )  # fmt: skip

    ours = sides(spi_peer, spi_ours, 0, 1, local_ts, remote_ts)
    theirs = sides(spi_ours, spi_peer, 1, 0, remote_ts, local_ts)
    return ours, theirs


def test_a_packet_goes_through_and_comes_back() -> None:
    gw, peer = Dataplane(), Dataplane()
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    gw.add(ours)
    peer.add(theirs)
    request = packet("10.100.0.1", "10.200.0.7")
    send = gw.outbound(request)
    assert send is not None and send.tunnel is ours
    assert send.esp[:4] == theirs.inbound.spi.to_bytes(4, "big")
    assert request not in send.esp
    assert peer.inbound(send.esp) == request
    reply = packet("10.200.0.7", "10.100.0.1")
    back = peer.outbound(reply)
    assert back is not None and gw.inbound(back.esp) == reply
    assert gw.counters["esp.out.packets"] == 1 and gw.counters["esp.in.packets"] == 1
    assert gw.show(1)["out"]["packets"] == 1 and gw.show(1)["in"]["bytes"] == len(reply)
    # the totals the metrics endpoint exports (ikefarm_esp_io_bytes_total): inner octets
    assert gw.counters["esp.out.bytes"] == len(request) and gw.counters["esp.in.bytes"] == len(
        reply
    )


def test_no_sa_and_wrong_source_are_dropped_and_counted() -> None:
    gw = Dataplane()
    ours, _theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    gw.add(ours)
    assert gw.outbound(packet("10.100.0.1", "10.99.0.1")) is None  # no remote selector
    assert gw.outbound(packet("10.101.0.1", "10.200.0.1")) is None  # source not ours
    assert gw.outbound(b"\x45\x00") is None
    assert gw.counters["esp.out.drop.no_sa"] == 2
    assert gw.counters["esp.out.drop.malformed"] == 1


def test_longest_prefix_then_newest_tunnel_wins() -> None:
    gw = Dataplane()
    wide, _ = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/16")
    narrow, _ = tunnel_pair(2, "10.100.0.0/24", "10.200.5.0/24")
    rekeyed, _ = tunnel_pair(3, "10.100.0.0/24", "10.200.5.0/24")
    for tunnel in (wide, narrow):
        gw.add(tunnel)

    def chosen(dst: str) -> int | None:
        send = gw.outbound(packet("10.100.0.1", dst))
        return send.tunnel.unique_id if send else None

    assert chosen("10.200.5.9") == 2 and chosen("10.200.6.1") == 1
    gw.add(rekeyed)  # the new child of a rekey takes over at once
    assert chosen("10.200.5.9") == 3
    gw.remove(3)
    assert chosen("10.200.5.9") == 2
    gw.remove(2)
    assert chosen("10.200.5.9") == 1
    gw.remove(1)
    assert chosen("10.200.5.9") is None


def test_replay_broken_icv_unknown_spi_and_policy_are_dropped_by_reason() -> None:
    gw, peer = Dataplane(), Dataplane()
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24")
    gw.add(ours)
    peer.add(theirs)
    send = peer.outbound(packet("10.200.0.7", "10.100.0.1"))
    assert send is not None
    assert gw.inbound(send.esp) is not None
    assert gw.inbound(send.esp) is None  # replayed
    later = peer.outbound(packet("10.200.0.7", "10.100.0.1", seq=2))
    assert later is not None
    broken = later.esp[:-1] + bytes([later.esp[-1] ^ 0x01])
    assert gw.inbound(broken) is None
    assert gw.inbound(later.esp) is not None  # the broken copy moved no window
    unknown = bytes.fromhex("deadbeef") + later.esp[4:]
    assert gw.inbound(unknown) is None
    # an authentic packet whose inner source is outside the SA's remote selectors
    inner_outside = theirs.outbound.encapsulate(packet("10.66.0.1", "10.100.0.1"))
    assert gw.inbound(inner_outside) is None
    counters = gw.counters
    assert counters["esp.in.drop.replay"] == 1 and counters["esp.in.drop.integrity"] == 1
    assert counters["esp.in.drop.unknown_spi"] == 1 and counters["esp.in.drop.policy"] == 1
    assert counters["esp.in.packets"] == 2
    assert ours.inbound.counters.drops == {"replay": 1, "integrity": 1}


def test_lifetimes_are_reported_once_each() -> None:
    gw, peer = Dataplane(), Dataplane()
    limits = Lifetime(soft_packets=2, hard_packets=3)
    ours, theirs = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24", lifetime=limits)
    gw.add(ours)
    peer.add(theirs)
    seen: list[tuple[int, LifetimeEvent]] = []
    gw.on_lifetime = lambda tunnel, event: seen.append((tunnel.unique_id, event))
    for seq in range(1, 5):
        send = gw.outbound(packet("10.100.0.1", "10.200.0.7", seq=seq))
        assert send is not None
    assert [(uid, e.direction, e.kind, e.limit) for uid, e in seen] == [
        (1, "out", "soft", "packets"),
        (1, "out", "hard", "packets"),
    ]
    assert gw.counters["esp.lifetime.out.soft"] == 1 and gw.counters["esp.lifetime.out.hard"] == 1


def test_esn_carries_traffic_across_the_32_bit_wrap() -> None:
    start = (1 << 32) - 3
    gw, peer = Dataplane(), Dataplane()
    ours, theirs = tunnel_pair(
        1, "10.100.0.0/24", "10.200.0.0/24", esn=True, seq=start, highest_seq=start
    )
    gw.add(ours)
    peer.add(theirs)
    for seq in range(6):
        request = packet("10.100.0.1", "10.200.0.7", seq=seq)
        send = gw.outbound(request)
        assert send is not None
        assert peer.inbound(send.esp) == request
    assert ours.outbound.seq == start + 6 > 1 << 32
    assert theirs.inbound.window.top == start + 6


def test_sequence_numbers_are_never_reused_without_esn() -> None:
    gw = Dataplane()
    ours, _ = tunnel_pair(1, "10.100.0.0/24", "10.200.0.0/24", seq=(1 << 32) - 2)
    gw.add(ours)
    assert gw.outbound(packet("10.100.0.1", "10.200.0.7")) is not None
    assert gw.outbound(packet("10.100.0.1", "10.200.0.7")) is None
    assert gw.counters["esp.out.drop.sequence_exhausted"] == 1


@pytest.mark.parametrize(
    ("selector", "networks"),
    [
        ("10.0.0.0/24", ["10.0.0.0/24"]),
        ("10.0.0.0..10.0.0.5", ["10.0.0.0/30", "10.0.0.4/31"]),
        ("2001:db8::/64", ["2001:db8::/64"]),
    ],
)
def test_selectors_become_networks(selector: str, networks: list[str]) -> None:
    assert selector_networks(selector) == [ipaddress.ip_network(n) for n in networks]


def test_port_selectors_are_not_implemented() -> None:
    with pytest.raises(NotImplementedError, match="not implemented"):
        selector_networks("10.0.0.0/24[tcp/80]")
