"""The userspace ESP codec (shared/esp/): format, algorithms, drops, lifetimes, engine keys."""

from __future__ import annotations

import struct
from dataclasses import replace

import pytest

from ikefarm.shared.esp import (
    Dropped,
    DropReason,
    EncapsulationRefused,
    EspTransform,
    InboundSa,
    InboundSaTable,
    Lifetime,
    LifetimeEvent,
    OutboundSa,
    UdpEncapKind,
    UnsupportedEspTransform,
    Unwrapped,
    classify_udp_encap,
    sa_pair,
)
from ikefarm.shared.ikev2.constants import EncrId, IntegId
from ikefarm.shared.ikev2.effects import InstallChildSa
from tests.engine_helpers import pair
from tests.esp_helpers import (
    ALGORITHMS,
    SPI,
    direction,
    ipv4_packet,
    ipv6_packet,
    keys,
    udp_packet,
)


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize("names", ALGORITHMS, ids=lambda n: "/".join(filter(None, n)))
def test_round_trip_ipv4_and_ipv6(names: tuple[str, str | None], esn: bool) -> None:
    outbound, inbound = direction(names, esn=esn)
    for number, inner in enumerate(
        [ipv4_packet(), ipv6_packet(), ipv4_packet(b"x" * 1400), ipv6_packet(b"")], start=1
    ):
        packet = outbound.encapsulate(inner)
        spi, seq = struct.unpack_from("!II", packet)
        assert (spi, seq) == (SPI, number)
        result = inbound.decapsulate(packet)
        assert result == Unwrapped(inner, SPI, number)
    assert outbound.counters.packets == inbound.counters.packets == 4
    assert outbound.counters.bytes == inbound.counters.bytes


@pytest.mark.parametrize("names", ALGORITHMS, ids=lambda n: "/".join(filter(None, n)))
def test_layout_padding_and_next_header(names: tuple[str, str | None]) -> None:
    """RFC 4303 2: SPI | seq | IV | ciphertext | ICV, the payload aligned (2.4)."""
    outbound, _ = direction(names)
    transform = outbound.transform
    for size in range(0, 40):
        inner = udp_packet(size)
        packet = outbound.encapsulate(inner)
        ciphertext = len(packet) - 8 - transform.iv_size - transform.icv_size
        assert ciphertext % transform.alignment == 0
        assert 0 <= ciphertext - len(inner) - 2 < transform.alignment  # minimal padding
    assert transform.alignment == (4 if transform.is_aead else 16)


def test_padding_and_next_header_are_as_rfc_4303_says() -> None:
    """Open a packet with the peer's keys by hand: padding 1, 2, 3 ..., then Pad Length, NH."""
    transform = EspTransform.from_names("aes128-cbc", "hmac-sha256")
    encr, integ = keys(transform)
    outbound = OutboundSa(SPI, transform, encr, integ)
    opener = transform.keyed(encr, integ)
    for inner, next_header in ((udp_packet(1), 4), (ipv6_packet(b"abc"), 41)):
        packet = outbound.encapsulate(inner)
        plaintext = opener.open(packet, outbound.seq, False)
        assert plaintext is not None
        pad = plaintext[-2]
        assert plaintext[-1] == next_header
        assert plaintext[: len(inner)] == inner
        assert plaintext[len(inner) : -2] == bytes(range(1, pad + 1))


def test_aead_explicit_iv_is_the_sequence_number() -> None:
    """RFC 4106 3.1: a counter IV cannot repeat under one key."""
    outbound, _ = direction(("aes256-gcm-128", None), esn=True, seq=(1 << 32) + 6)
    packet = outbound.encapsulate(ipv4_packet())
    assert packet[8:16] == ((1 << 32) + 7).to_bytes(8, "big")
    assert packet[4:8] == (7).to_bytes(4, "big")


def test_cbc_iv_comes_from_the_injected_source() -> None:
    transform = EspTransform.from_names("aes256-cbc", "hmac-sha256")
    encr, integ = keys(transform)
    asked: list[int] = []

    def iv_source(n: int) -> bytes:
        asked.append(n)
        return bytes(range(n))

    packet = OutboundSa(SPI, transform, encr, integ, random=iv_source).encapsulate(ipv4_packet())
    assert asked == [16]
    assert packet[8:24] == bytes(range(16))


def test_transform_names_and_sizes_follow_the_engine() -> None:
    gcm = EspTransform.from_names("aes256gcm16")  # strongSwan alias of aes256-gcm-128
    assert gcm == EspTransform(EncrId.AES_GCM_16, 256)
    assert (gcm.name, gcm.encr_key_size, gcm.integ_key_size, gcm.icv_size) == (
        "aes256-gcm-128",
        36,
        0,
        16,
    )
    chacha = EspTransform.from_names("chacha20-poly1305")
    assert (chacha.encr_key_size, chacha.iv_size, chacha.icv_size) == (36, 8, 16)
    cbc = EspTransform.from_names("aes192-cbc", "hmac-sha384")
    assert cbc == EspTransform(EncrId.AES_CBC, 192, IntegId.HMAC_SHA2_384_192)
    assert (cbc.name, cbc.encr_key_size, cbc.integ_key_size, cbc.icv_size) == (
        "aes192-cbc/hmac-sha384",
        24,
        48,
        24,
    )
    sha1 = EspTransform.from_names("aes128-cbc", "hmac-sha1")
    assert (sha1.integ_key_size, sha1.icv_size) == (20, 12)


@pytest.mark.parametrize(
    "args",
    [
        (EncrId.AES_GCM_16, 256, IntegId.HMAC_SHA2_256_128),  # AEAD plus integrity
        (EncrId.AES_CBC, 128, None),  # no encryption-only ESP
        (EncrId.AES_CBC, 100, IntegId.HMAC_SHA2_256_128),
        (EncrId.AES_CTR, 128, IntegId.HMAC_SHA2_256_128),
        (EncrId.AES_CBC, 128, IntegId.AES_XCBC_96),
    ],
)
def test_unsupported_transforms_are_refused(args: tuple[int, int | None, int | None]) -> None:
    with pytest.raises(UnsupportedEspTransform):
        EspTransform(*args)


def test_unknown_algorithm_names_are_refused() -> None:
    with pytest.raises(UnsupportedEspTransform, match="unknown"):
        EspTransform.from_names("aes256-gcm-64")
    with pytest.raises(UnsupportedEspTransform, match="unknown"):
        EspTransform.from_names("aes128-cbc", "hmac-md5")


def test_wrong_key_lengths_are_refused_without_the_key() -> None:
    transform = EspTransform.from_names("aes128-cbc", "hmac-sha256")
    secret = b"\x42" * 17
    with pytest.raises(ValueError, match="16-octet encryption key") as caught:
        OutboundSa(SPI, transform, secret, b"\x01" * 32)
    assert secret.hex() not in str(caught.value) and repr(secret) not in str(caught.value)


def test_repr_names_no_key() -> None:
    transform = EspTransform.from_names("aes128-gcm-128")
    key = bytes(range(20))
    for sa in (OutboundSa(SPI, transform, key), InboundSa(SPI, transform, key, esn=True)):
        text = repr(sa) + repr(sa._keyed)
        assert key.hex() not in text and repr(key) not in text and str(list(key)) not in text
        assert "0xc0ffee01" in repr(sa)


def test_no_sequence_number_is_reused_without_esn() -> None:
    """RFC 4303 3.3.3: the counter never cycles; the SA must be rekeyed."""
    outbound, inbound = direction(esn=False, seq=(1 << 32) - 2, highest_seq=(1 << 32) - 2)
    last = outbound.encapsulate(ipv4_packet())
    assert inbound.decapsulate(last) == Unwrapped(ipv4_packet(), SPI, (1 << 32) - 1)
    for _ in range(2):
        with pytest.raises(EncapsulationRefused, match="rekey") as caught:
            outbound.encapsulate(ipv4_packet())
        assert caught.value.reason == "sequence_exhausted"
    assert outbound.seq == (1 << 32) - 1
    assert outbound.counters.drops["sequence_exhausted"] == 2
    assert outbound.counters.packets == 1


def test_no_sequence_number_is_reused_with_esn() -> None:
    outbound, _ = direction(esn=True, seq=(1 << 64) - 2)
    outbound.encapsulate(ipv4_packet())
    with pytest.raises(EncapsulationRefused) as caught:
        outbound.encapsulate(ipv4_packet())
    assert caught.value.reason == "sequence_exhausted"
    assert outbound.seq == (1 << 64) - 1


@pytest.mark.parametrize(
    "inner",
    [
        b"",
        b"\x45" + bytes(10),  # shorter than an IPv4 header
        ipv4_packet()[:-1],  # total length past the end
        ipv4_packet() + b"\x00",  # trailing octets: not one whole packet
        b"\x4f" + ipv4_packet()[1:],  # IHL larger than the total length allows
        b"\x60" + bytes(39),  # IPv6 payload length 0 (jumbogram)
        ipv6_packet()[:-1],
        b"\x50" + bytes(40),  # version 5
    ],
    ids=["empty", "short-v4", "cut-v4", "trailing", "ihl", "jumbo", "cut-v6", "v5"],
)
def test_outbound_refuses_a_malformed_inner_packet(inner: bytes) -> None:
    outbound, _ = direction()
    with pytest.raises(EncapsulationRefused) as caught:
        outbound.encapsulate(inner)
    assert caught.value.reason == "inner_malformed"
    assert outbound.seq == 0 and outbound.counters.drops["inner_malformed"] == 1


def authentic(inbound: InboundSa, plaintext: bytes, seq: int) -> bytes:
    """An ESP packet with a valid ICV around arbitrary plaintext, as a buggy peer would send."""
    keyed = inbound._keyed
    header = struct.pack("!II", inbound.spi, seq & 0xFFFFFFFF)
    return header + keyed.seal(header, seq, inbound.esn, plaintext, lambda n: bytes(n))


@pytest.mark.parametrize("names", [ALGORITHMS[2], ALGORITHMS[4]], ids=["gcm", "cbc"])
def test_authentic_but_wrong_trailers_are_dropped_by_reason(names: tuple[str, str | None]) -> None:
    _, inbound = direction(names)
    inner = ipv4_packet(b"x" * 18)
    assert len(inner) % 16 == 14  # so that 0 padding octets align CBC
    cases = [
        (inner + b"\x00\x04", None),
        (inner[:-2] + b"\x09\x03" + b"\x03\x04", DropReason.BAD_PADDING),  # padding not 1, 2, 3
        (inner[:-1] + b"\x01" + b"\x40\x04", DropReason.BAD_PADDING),  # pad length too long
        (inner + b"\x00\x11", DropReason.BAD_NEXT_HEADER),  # UDP: transport mode, not ours
        (inner + b"\x00\x3b", DropReason.DUMMY),  # RFC 4303 2.6
        (inner + b"\x00\x29", DropReason.INNER_MALFORMED),  # says IPv6, carries IPv4
        (b"\x45" + bytes(13) + b"\x00\x04", DropReason.INNER_MALFORMED),
    ]
    for seq, (plaintext, reason) in enumerate(cases, start=1):
        result = inbound.decapsulate(authentic(inbound, plaintext, seq))
        if reason is None:
            assert result == Unwrapped(inner, SPI, seq)
        else:
            assert result == Dropped(reason, SPI, seq)
            assert inbound.counters.drops[reason] >= 1
    # dropped packets do not move the window: their numbers are still fresh
    assert inbound.window.top == 1
    assert inbound.decapsulate(authentic(inbound, inner + b"\x00\x04", 3)) == Unwrapped(
        inner, SPI, 3
    )


def test_cbc_ciphertext_not_block_aligned_is_bad_padding() -> None:
    _, inbound = direction(("aes128-cbc", "hmac-sha256"))
    keyed = inbound._keyed
    header = struct.pack("!II", SPI, 1)
    body = bytes(16) + bytes(20)  # IV and a ciphertext of 20 octets
    icv = keyed._icv(header + body, 1, False)  # type: ignore[attr-defined]
    assert inbound.decapsulate(header + body + icv) == Dropped(DropReason.BAD_PADDING, SPI, 1)


def test_tfc_padding_after_the_inner_packet_is_trimmed() -> None:
    """RFC 4303 2.7: the inner IP length says where the packet ends."""
    _, inbound = direction()
    inner = ipv6_packet(b"abc")
    plaintext = inner + bytes(29) + b"\x01\x02\x03\x03\x29"
    assert inbound.decapsulate(authentic(inbound, plaintext, 1)) == Unwrapped(inner, SPI, 1)


def test_too_short_and_foreign_spi() -> None:
    outbound, inbound = direction(("aes128-cbc", "hmac-sha1"))
    packet = outbound.encapsulate(ipv4_packet())
    minimum = 8 + 16 + 16 + 12
    assert inbound.decapsulate(packet[: minimum - 1]) == Dropped(DropReason.TOO_SHORT, SPI)
    assert inbound.decapsulate(packet[:minimum]).reason == DropReason.INTEGRITY  # type: ignore[union-attr]
    other = (SPI + 1).to_bytes(4, "big") + packet[4:]
    assert inbound.decapsulate(other) == Dropped(DropReason.UNKNOWN_SPI, SPI)
    assert inbound.decapsulate(packet) == Unwrapped(ipv4_packet(), SPI, 1)


def test_table_finds_the_sa_by_spi_and_counts_its_own_drops() -> None:
    table = InboundSaTable()
    senders = {}
    for spi in (0x100, 0x200, 0x300):
        transform = EspTransform.from_names("aes128-gcm-128")
        encr, integ = keys(transform)
        table.add(InboundSa(spi, transform, encr, integ))
        senders[spi] = OutboundSa(spi, transform, encr, integ)
    with pytest.raises(ValueError, match="exists"):
        table.add(InboundSa(0x100, transform, encr, integ))
    for spi, sender in senders.items():
        result = table.decapsulate(sender.encapsulate(ipv4_packet()))
        assert result == Unwrapped(ipv4_packet(), spi, 1)
    assert table.decapsulate(b"\x00\x00\x01") == Dropped(DropReason.TOO_SHORT)
    assert table.decapsulate(bytes.fromhex("000004000000000100")) == Dropped(
        DropReason.UNKNOWN_SPI, 0x400
    )
    removed = table.remove(0x200)
    assert removed is not None and 0x200 not in table and len(table) == 2
    assert table.decapsulate(senders[0x200].encapsulate(ipv4_packet())) == Dropped(
        DropReason.UNKNOWN_SPI, 0x200
    )
    assert table.drops == {"too_short": 1, "unknown_spi": 2}


def test_lifetimes_are_reported_once_each() -> None:
    transform = EspTransform.from_names("aes128-gcm-128")
    encr, integ = keys(transform)
    lifetime = Lifetime(soft_bytes=500, hard_bytes=1100, soft_packets=2, hard_packets=5)
    outbound = OutboundSa(SPI, transform, encr, integ, lifetime=lifetime)
    inbound = InboundSa(SPI, transform, encr, integ, lifetime=lifetime)
    seen_out: list[LifetimeEvent] = []
    seen_in: list[LifetimeEvent] = []
    inner = udp_packet(172)  # 200 octets
    for _ in range(7):
        inbound.decapsulate(outbound.encapsulate(inner))
        seen_out += outbound.take_events()
        seen_in += inbound.take_events()
    assert seen_out == [
        LifetimeEvent(SPI, "out", "soft", "packets"),
        LifetimeEvent(SPI, "out", "soft", "bytes"),
        LifetimeEvent(SPI, "out", "hard", "packets"),
        LifetimeEvent(SPI, "out", "hard", "bytes"),
    ]
    assert [(e.direction, e.kind, e.limit) for e in seen_in] == [
        ("in", e.kind, e.limit) for e in seen_out
    ]
    assert not outbound.has_events and outbound.take_events() == []
    # reporting is all: the SA goes on until the caller deletes it
    assert outbound.counters.packets == inbound.counters.packets == 7


@pytest.mark.parametrize(
    ("payload", "kind"),
    [
        (b"\xff", UdpEncapKind.KEEPALIVE),
        (bytes(4) + bytes(28), UdpEncapKind.IKE),
        (bytes(4) + bytes(27), UdpEncapKind.MALFORMED),
        (bytes(4), UdpEncapKind.MALFORMED),
        (b"", UdpEncapKind.MALFORMED),
        (b"\xff\xff", UdpEncapKind.MALFORMED),
        (b"\x00\x00\x00\x01\x00\x00\x00\x01", UdpEncapKind.ESP),
        (b"\xff" * 8, UdpEncapKind.ESP),
        (b"\x00\x00\x00\x01\x00\x00\x00", UdpEncapKind.MALFORMED),
    ],
)
def test_udp_4500_classifier(payload: bytes, kind: UdpEncapKind) -> None:
    """RFC 3948 2.1-2.3: non-ESP marker = IKE, one 0xFF = keepalive, else ESP."""
    assert classify_udp_encap(payload) == kind


def test_classifier_on_real_traffic() -> None:
    outbound, _ = direction()
    assert classify_udp_encap(outbound.encapsulate(ipv4_packet())) == UdpEncapKind.ESP


ENGINE_ESP = """
[[ike.ipsec-policy-template]]
name = "esp"
replay-window = 64
[[ike.ipsec-policy-template.esp-proposal]]
{proposal}
esn = [{esn}]
"""


@pytest.mark.parametrize(
    "proposal",
    [
        'aead-alg = "aes256-gcm-128"',
        'aead-alg = "chacha20-poly1305"',
        'enc-alg = "aes128-cbc"\nauth-alg = "hmac-sha256"',
        'enc-alg = "aes256-cbc"\nauth-alg = "hmac-sha512"',
    ],
    ids=["gcm", "chacha", "cbc-sha256", "cbc-sha512"],
)
@pytest.mark.parametrize("esn", ["false", "true"])
def test_child_sa_keys_from_the_engine_protect_both_directions(proposal: str, esn: str) -> None:
    """The engine's KEYMAT split (RFC 7296 2.17) is the codec's: each side opens what the other
    sealed, for the child of IKE_AUTH and for the child of a responder-initiated rekey."""
    extra = ENGINE_ESP.format(proposal=proposal, esn=esn)
    vpn = 'ipsec-policy = { template = "esp" }'
    wire = pair(extra, extra, responder_vpn=vpn, initiator_vpn=vpn)
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (r_sa,) = wire.responder.engine.sas.values()
    (child,) = r_sa.children
    wire.run(wire.responder.engine.rekey_child(r_sa, child, wire.now), wire.responder)

    def installs(side) -> list:  # type: ignore[no-untyped-def]
        return [e.child for e in side.effects if isinstance(e, InstallChildSa)]

    i_installs, r_installs = installs(wire.initiator), installs(wire.responder)
    assert len(i_installs) == len(r_installs) == 2
    for i_install, r_install in zip(i_installs, r_installs, strict=True):
        assert i_install.esn is (esn == "true") and i_install.replay_window == 64
        i_in, i_out = sa_pair(i_install)
        r_in, r_out = sa_pair(r_install)
        assert i_out.spi == r_in.spi and r_out.spi == i_in.spi
        assert r_in.decapsulate(i_out.encapsulate(ipv4_packet())) == Unwrapped(
            ipv4_packet(), r_in.spi, 1
        )
        assert i_in.decapsulate(r_out.encapsulate(ipv6_packet())) == Unwrapped(
            ipv6_packet(), i_in.spi, 1
        )
        assert r_in.window.size == 64


def test_sa_pair_refuses_transport_mode() -> None:
    wire = pair()
    wire.run(wire.initiator.engine.initiate("hq", "net", wire.now), wire.initiator)
    (install,) = [e.child for e in wire.responder.effects if isinstance(e, InstallChildSa)]
    with pytest.raises(ValueError, match="tunnel-mode ESP only"):
        sa_pair(replace(install, mode="transport"))
