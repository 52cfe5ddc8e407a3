"""scapy's ESP (`scapy.layers.ipsec.SecurityAssociation`) as an independent oracle.

Packets we seal open in scapy and scapy's open in ours, with and without ESN;
with the same IV the two produce the same octets. Two fixed vectors, made once
with scapy and stored as hex, fail the suite if either side changes.
"""

from __future__ import annotations

import pytest
from scapy.compat import raw
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import ESP, SecurityAssociation
from scapy.packet import Packet

from ikefarm.shared.esp import EspTransform, InboundSa, OutboundSa, Unwrapped
from tests.esp_helpers import SPI, ipv4_packet, ipv6_packet, keys

# ours -> scapy's names (scapy.layers.ipsec.CRYPT_ALGOS / AUTH_ALGOS)
ORACLE: list[tuple[tuple[str, str | None], str, str | None]] = [
    (("aes128-gcm-128", None), "AES-GCM", None),
    (("aes192-gcm-128", None), "AES-GCM", None),
    (("aes256-gcm-128", None), "AES-GCM", None),
    (("chacha20-poly1305", None), "CHACHA20-POLY1305", None),
    (("aes128-cbc", "hmac-sha256"), "AES-CBC", "SHA2-256-128"),
    (("aes256-cbc", "hmac-sha256"), "AES-CBC", "SHA2-256-128"),
    (("aes256-cbc", "hmac-sha1"), "AES-CBC", "HMAC-SHA1-96"),
    (("aes192-cbc", "hmac-sha512"), "AES-CBC", "SHA2-512-256"),
]
TUNNEL = IP(src="192.0.2.1", dst="192.0.2.2")
CBC_IV = bytes(range(0xA0, 0xB0))
# sequence numbers to send: the start, and with ESN both sides of the 2^32 wrap
SEQUENCES = {False: [1, 2, 77], True: [1, (1 << 32) - 1, 1 << 32, (1 << 32) + 5]}


def scapy_sa(
    oracle: tuple[str, str | None], encr: bytes, integ: bytes, esn: bool, spi: int = SPI
) -> SecurityAssociation:
    crypt_algo, auth_algo = oracle
    return SecurityAssociation(
        ESP,
        spi=spi,
        crypt_algo=crypt_algo,
        crypt_key=encr,
        auth_algo=auth_algo,
        auth_key=integ or None,
        tunnel_header=TUNNEL,
        esn_en=esn,
    )


def scapy_seal(sa: SecurityAssociation, inner: bytes, seq: int, iv: bytes) -> bytes:
    """ESP octets from scapy for `seq` (its `seq_num`/`esn` are the low/high halves)."""
    sa.seq_num, sa.esn = seq & 0xFFFFFFFF, seq >> 32
    packet = IP(inner) if inner[0] >> 4 == 4 else IPv6(inner)
    return raw(sa.encrypt(packet, iv=iv)[ESP])


def scapy_open(sa: SecurityAssociation, esp: bytes, seq: int) -> bytes:
    sa.esn = seq >> 32
    wire = IP(raw(TUNNEL.copy() / ESP(esp)))
    inner: Packet = sa.decrypt(wire)
    return raw(inner)


def iv_for(transform: EspTransform, seq: int) -> bytes:
    return seq.to_bytes(8, "big") if transform.is_aead else CBC_IV


@pytest.mark.parametrize("esn", [False, True], ids=["no-esn", "esn"])
@pytest.mark.parametrize(
    ("names", "crypt_algo", "auth_algo"),
    ORACLE,
    ids=[f"{n[0]}{'/' + n[1] if n[1] else ''}" for n, _, _ in ORACLE],
)
def test_scapy_and_we_agree(
    names: tuple[str, str | None], crypt_algo: str, auth_algo: str | None, esn: bool
) -> None:
    transform = EspTransform.from_names(*names)
    encr, integ = keys(transform)
    oracle = scapy_sa((crypt_algo, auth_algo), encr, integ, esn)
    for seq in SEQUENCES[esn]:
        for inner in (ipv4_packet(seq=seq & 0xFFFF), ipv6_packet(b"v6" * 30)):
            ours = OutboundSa(
                SPI, transform, encr, integ, esn=esn, seq=seq - 1, random=lambda _: CBC_IV
            ).encapsulate(inner)
            # our packet opens in scapy
            assert scapy_open(oracle, ours, seq) == inner
            # scapy's packet opens in ours, and with the same IV it is the same packet
            theirs = scapy_seal(oracle, inner, seq, iv_for(transform, seq))
            assert theirs == ours
            inbound = InboundSa(SPI, transform, encr, integ, esn=esn, highest_seq=max(seq - 1, 0))
            assert inbound.decapsulate(theirs) == Unwrapped(inner, SPI, seq)


def test_scapy_random_iv_packets_open_in_ours() -> None:
    """scapy picks its own random CBC IV; only the receiving side is ours."""
    transform = EspTransform.from_names("aes128-cbc", "hmac-sha256")
    encr, integ = keys(transform)
    oracle = scapy_sa(("AES-CBC", "SHA2-256-128"), encr, integ, False)
    inbound = InboundSa(SPI, transform, encr, integ)
    for seq in range(1, 6):
        oracle.seq_num = seq
        esp = raw(oracle.encrypt(IP(ipv4_packet(seq=seq)))[ESP])
        assert inbound.decapsulate(esp) == Unwrapped(ipv4_packet(seq=seq), SPI, seq)


INNER = bytes.fromhex(
    "4500002e0001000040012664c6336401c633640208003bb300070001696b656661726d2065737020766563746f72"
)
# scapy 2.8.0: SecurityAssociation(ESP, spi=0x0a0b0c0d, crypt_algo="AES-GCM",
# crypt_key=bytes(range(1, 37))), seq_num=5, iv=(5).to_bytes(8, "big")
GCM_VECTOR = bytes.fromhex(
    "0a0b0c0d00000005000000000000000566b4749a82bed88b901110f2b1ded638dbe5cef488be61ba5aa01276"
    "63b5c923429a025fb7a5c9e0bd050a1c2dcb9ad4779b11fd1cd19e848525f8b40b200941"
)
# scapy 2.8.0: spi=0x01020304, AES-CBC key bytes(range(0x40, 0x50)), SHA2-256-128 key
# bytes(range(0x60, 0x80)), IV bytes(range(0xa0, 0xb0)), ESN with seq-hi 1, seq-lo 5
CBC_ESN_VECTOR = bytes.fromhex(
    "0102030400000005a0a1a2a3a4a5a6a7a8a9aaabacadaeaf1c3c0e7c4b2cc1e2e6ef0d0e519f44281eec8c19"
    "65b49ea62b475b0a8ebb965c5e31e8fe077ceb6c5bbb91cb5dc147d0406e4cb44edce6aaf1291974c1258c77"
)


def test_fixed_vector_aes_gcm() -> None:
    transform = EspTransform.from_names("aes256-gcm-128")
    key = bytes(range(1, 37))
    outbound = OutboundSa(0x0A0B0C0D, transform, key, seq=4)
    assert outbound.encapsulate(INNER) == GCM_VECTOR
    inbound = InboundSa(0x0A0B0C0D, transform, key)
    assert inbound.decapsulate(GCM_VECTOR) == Unwrapped(INNER, 0x0A0B0C0D, 5)
    oracle = scapy_sa(("AES-GCM", None), key, b"", False, spi=0x0A0B0C0D)
    assert scapy_seal(oracle, INNER, 5, GCM_VECTOR[8:16]) == GCM_VECTOR


def test_fixed_vector_aes_cbc_hmac_sha256_with_esn() -> None:
    transform = EspTransform.from_names("aes128-cbc", "hmac-sha256")
    encr, integ = bytes(range(0x40, 0x50)), bytes(range(0x60, 0x80))
    seq = (1 << 32) + 5
    outbound = OutboundSa(
        0x01020304, transform, encr, integ, esn=True, seq=seq - 1, random=lambda _: CBC_IV
    )
    assert outbound.encapsulate(INNER) == CBC_ESN_VECTOR
    inbound = InboundSa(0x01020304, transform, encr, integ, esn=True, highest_seq=1 << 32)
    assert inbound.decapsulate(CBC_ESN_VECTOR) == Unwrapped(INNER, 0x01020304, seq)
    # without seq-hi in the ICV (no ESN) the same octets do not verify
    plain = InboundSa(0x01020304, transform, encr, integ)
    assert plain.decapsulate(CBC_ESN_VECTOR).reason == "integrity"  # type: ignore[union-attr]
    oracle = scapy_sa(("AES-CBC", "SHA2-256-128"), encr, integ, True, spi=0x01020304)
    assert scapy_seal(oracle, INNER, seq, CBC_IV) == CBC_ESN_VECTOR
