"""Known-answer and robustness tests of shared/ikev2/crypto/dh.py."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.shared.ikev2.constants import DhId
from ikefarm.shared.ikev2.crypto.dh import (
    SUPPORTED_DH_GROUPS,
    DhExchange,
    InvalidKeyExchange,
    UnsupportedGroup,
    key_exchange_length,
    modp_prime,
)
from ikefarm.shared.ikev2.crypto.registry import UnsupportedTransform

H = bytes.fromhex

# RFC 5903 section 8 (8.1, 8.2, 8.3): i, g^i, r, g^r and the x coordinate of g^ir.
RFC5903 = {
    DhId.ECP_256: {
        "i": "c88f01f510d9ac3f70a292daa2316de544e9aab8afe84049c62a9c57862d1433",
        "gix": "dad0b65394221cf9b051e1feca5787d098dfe637fc90b9ef945d0c3772581180",
        "giy": "5271a0461cdb8252d61f1c456fa3e59ab1f45b33accf5f58389e0577b8990bb3",
        "r": "c6ef9c5d78ae012a011164acb397ce2088685d8f06bf9be0b283ab46476bee53",
        "grx": "d12dfb5289c8d4f81208b70270398c342296970a0bccb74c736fc7554494bf63",
        "gry": "56fbf3ca366cc23e8157854c13c58d6aac23f046ada30f8353e74f33039872ab",
        "girx": "d6840f6b42f6edafd13116e0e12565202fef8e9ece7dce03812464d04b9442de",
    },
    DhId.ECP_384: {
        "i": "099f3c7034d4a2c699884d73a375a67f7624ef7c6b3c0f160647b67414dce655"
        "e35b538041e649ee3faef896783ab194",
        "gix": "667842d7d180ac2cde6f74f37551f55755c7645c20ef73e31634fe72b4c55ee6"
        "de3ac808acb4bdb4c88732aee95f41aa",
        "giy": "9482ed1fc0eeb9cafc4984625ccfc23f65032149e0e144ada024181535a0f38e"
        "eb9fcff3c2c947dae69b4c634573a81c",
        "r": "41cb0779b4bdb85d47846725fbec3c9430fab46cc8dc5060855cc9bda0aa2942"
        "e0308312916b8ed2960e4bd55a7448fc",
        "grx": "e558dbef53eecde3d3fccfc1aea08a89a987475d12fd950d83cfa41732bc509d"
        "0d1ac43a0336def96fda41d0774a3571",
        "gry": "dcfbec7aacf3196472169e838430367f66eebe3c6e70c416dd5f0c68759dd1ff"
        "f83fa40142209dff5eaad96db9e6386c",
        "girx": "11187331c279962d93d604243fd592cb9d0a926f422e47187521287e7156c5c4"
        "d603135569b9e9d09cf5d4a270f59746",
    },
    DhId.ECP_521: {
        "i": "0037ade9319a89f4dabdb3ef411aaccca5123c61acab57b5393dce47608172a0"
        "95aa85a30fe1c2952c6771d937ba9777f5957b2639bab072462f68c27a57382d4a52",
        "gix": "0015417e84dbf28c0ad3c278713349dc7df153c897a1891bd98bab4357c9ecbe"
        "e1e3bf42e00b8e380aeae57c2d107564941885942af5a7f4601723c4195d176ced3e",
        "giy": "017cae20b6641d2eeb695786d8c946146239d099e18e1d5a514c739d7cb4a10a"
        "d8a788015ac405d7799dc75e7b7d5b6cf2261a6a7f1507438bf01beb6ca3926f9582",
        "r": "0145ba99a847af43793fdd0e872e7cdfa16be30fdc780f97bccc3f078380201e"
        "9c677d600b343757a3bdbf2a3163e4c2f869cca7458aa4a4effc311f5cb151685eb9",
        "grx": "00d0b3975ac4b799f5bea16d5e13e9af971d5e9b984c9f39728b5e5739735a21"
        "9b97c356436adc6e95bb0352f6be64a6c2912d4ef2d0433ced2b6171640012d9460f",
        "gry": "015c68226383956e3bd066e797b623c27ce0eac2f551a10c2c724d9852077b87"
        "220b6536c5c408a1d2aebb8e86d678ae49cb57091f4732296579ab44fcd17f0fc56a",
        "girx": "01144c7d79ae6956bc8edb8e7c787c4521cb086fa64407f97894e5e6b2d79b04"
        "d1427e73ca4baa240a34786859810c06b3c715a3a8cc3151f2bee417996d19f3ddea",
    },
}


@pytest.mark.parametrize("group", sorted(RFC5903))
def test_ecp_rfc5903_known_answer(group: int) -> None:
    v = RFC5903[group]
    initiator = DhExchange.from_private_bytes(group, H(v["i"]))
    responder = DhExchange.from_private_bytes(group, H(v["r"]))
    gi = H(v["gix"]) + H(v["giy"])
    gr = H(v["grx"]) + H(v["gry"])
    # RFC 5903 7: KE data is x | y without the 0x04 point-format octet.
    assert initiator.public_bytes() == gi
    assert responder.public_bytes() == gr
    assert len(gi) == key_exchange_length(group)
    # RFC 5903 7 (errata 2925): the shared secret is the x coordinate only.
    assert initiator.compute_shared(gr) == H(v["girx"])
    assert responder.compute_shared(gi) == H(v["girx"])


# RFC 7748 section 6.1: Alice and Bob.
ALICE_PRIVATE = H("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
ALICE_PUBLIC = H("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
BOB_PRIVATE = H("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
BOB_PUBLIC = H("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
X25519_SHARED = H("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")


def test_x25519_rfc7748_diffie_hellman() -> None:
    alice = DhExchange.from_private_bytes(DhId.CURVE25519, ALICE_PRIVATE)
    bob = DhExchange.from_private_bytes(DhId.CURVE25519, BOB_PRIVATE)
    assert alice.public_bytes() == ALICE_PUBLIC
    assert bob.public_bytes() == BOB_PUBLIC
    assert alice.compute_shared(BOB_PUBLIC) == X25519_SHARED
    assert bob.compute_shared(ALICE_PUBLIC) == X25519_SHARED


@pytest.mark.parametrize(
    ("scalar", "u", "output"),
    [
        # RFC 7748 section 5.2, both vectors (the second has the u coordinate's top bit
        # set, which X25519 must ignore, RFC 7748 5).
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_x25519_rfc7748_scalar_multiplication(scalar: str, u: str, output: str) -> None:
    exchange = DhExchange.from_private_bytes(DhId.CURVE25519, H(scalar))
    assert exchange.compute_shared(H(u)) == H(output)


# --- MODP: the primes are the RFC 3526 ones -------------------------------------------------


def _pi_times_power_of_two(bits: int) -> int:
    """floor(pi * 2^bits) by Machin's formula, independent of the module under test."""
    guard = 64
    one = 1 << (bits + guard)

    def arctan_inverse(x: int) -> int:
        total = term = one // x
        x_squared, n, sign = x * x, 1, -1
        while term:
            term //= x_squared
            total += sign * (term // (2 * n + 1))
            sign, n = -sign, n + 1
        return total

    return (4 * (4 * arctan_inverse(5) - arctan_inverse(239))) >> guard


def _probably_prime(n: int, rounds: int = 4) -> bool:
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = random.Random(7296)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


# RFC 3526: p = 2^n - 2^(n-64) - 1 + 2^64 * ([2^(n-130) pi] + k), generator 2.
RFC3526 = {
    DhId.MODP_2048: (2048, 124476),
    DhId.MODP_3072: (3072, 1690314),
    DhId.MODP_4096: (4096, 240904),
}


@pytest.mark.parametrize("group", sorted(RFC3526))
def test_modp_primes_are_rfc3526(group: int) -> None:
    n, k = RFC3526[group]
    expected = 2**n - 2 ** (n - 64) - 1 + 2**64 * (_pi_times_power_of_two(n - 130) + k)
    p = modp_prime(group)
    assert p == expected
    assert p.bit_length() == n
    assert key_exchange_length(group) == n // 8
    # The RFC's printed form starts and ends the same way for every group.
    text = format(p, "X")
    assert text.startswith("FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD1")
    assert text.endswith("FFFFFFFFFFFFFFFF")
    # Safe primes: p and (p - 1) / 2 both prime.
    assert _probably_prime(p)
    assert _probably_prime((p - 1) // 2)


@pytest.mark.parametrize("group", sorted(RFC3526))
def test_modp_shared_secret_matches_modular_exponentiation(group: int) -> None:
    p = modp_prime(group)
    length = key_exchange_length(group)
    x = random.Random(group).getrandbits(256) | 1
    mine = DhExchange.from_private_bytes(group, x.to_bytes(32, "big"))
    assert mine.public_bytes() == pow(2, x, p).to_bytes(length, "big")
    peer = DhExchange.generate(group)
    y = int.from_bytes(peer.public_bytes(), "big")
    shared = mine.compute_shared(peer.public_bytes())
    assert shared == pow(y, x, p).to_bytes(length, "big")
    assert shared == peer.compute_shared(mine.public_bytes())


def test_modp_values_are_left_padded_to_the_prime_length() -> None:
    # private 8 with peer value 2: g^ir = 2^8 = 256, 254 zero octets then 0x01 0x00.
    group = DhId.MODP_2048
    mine = DhExchange.from_private_bytes(group, bytes([8]))
    assert mine.public_bytes() == (256).to_bytes(256, "big")
    peer_value = (2).to_bytes(256, "big")
    assert mine.compute_shared(peer_value) == (256).to_bytes(256, "big")


@pytest.mark.parametrize("group", sorted(SUPPORTED_DH_GROUPS))
def test_generated_pairs_agree(group: int) -> None:
    a = DhExchange.generate(group)
    b = DhExchange.generate(group)
    assert a.group == group
    assert len(a.public_bytes()) == key_exchange_length(group)
    shared = a.compute_shared(b.public_bytes())
    assert shared == b.compute_shared(a.public_bytes())
    expected_length = {
        DhId.ECP_256: 32,
        DhId.ECP_384: 48,
        DhId.ECP_521: 66,
        DhId.CURVE25519: 32,
    }.get(DhId(group), key_exchange_length(group))
    assert len(shared) == expected_length


def test_supported_groups_and_lengths() -> None:
    assert {14, 15, 16, 19, 20, 21, 31} == SUPPORTED_DH_GROUPS
    lengths = {g: key_exchange_length(g) for g in SUPPORTED_DH_GROUPS}
    assert lengths == {14: 256, 15: 384, 16: 512, 19: 64, 20: 96, 21: 132, 31: 32}


@pytest.mark.parametrize("group", [0, 1, 2, 5, 17, 18, 22, 32, 1000])
def test_unsupported_groups(group: int) -> None:
    with pytest.raises(UnsupportedGroup) as info:
        DhExchange.generate(group)
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, UnsupportedTransform)
    with pytest.raises(UnsupportedGroup):
        key_exchange_length(group)
    with pytest.raises(UnsupportedGroup):
        DhExchange.from_private_bytes(group, b"\x01")


# --- invalid peer values -----------------------------------------------------------------------


@pytest.mark.parametrize("group", sorted(SUPPORTED_DH_GROUPS))
def test_wrong_length_is_refused(group: int) -> None:
    exchange = DhExchange.generate(group)
    good = DhExchange.generate(group).public_bytes()
    for bad in (b"", good[:-1], good + b"\x00", b"\x04" + good):
        with pytest.raises(InvalidKeyExchange):
            exchange.compute_shared(bad)


@pytest.mark.parametrize("group", sorted(RFC3526))
def test_modp_out_of_range_values_are_refused(group: int) -> None:
    p = modp_prime(group)
    length = key_exchange_length(group)
    exchange = DhExchange.generate(group)
    for value in (0, 1, p - 1, p, p + 1, 2 ** (8 * length) - 1):
        with pytest.raises(InvalidKeyExchange):
            exchange.compute_shared(value.to_bytes(length, "big"))


@pytest.mark.parametrize("group", sorted(RFC5903))
def test_ecp_points_off_the_curve_are_refused(group: int) -> None:
    v = RFC5903[group]
    size = key_exchange_length(group) // 2
    exchange = DhExchange.generate(group)
    gr = bytearray(H(v["grx"]) + H(v["gry"]))
    gr[-1] ^= 0x01  # y no longer matches x
    field_prime_ish = b"\xff" * size  # coordinates at or above the field prime
    for bad in (bytes(gr), bytes(2 * size), field_prime_ish * 2, H(v["grx"]) + field_prime_ish):
        with pytest.raises(InvalidKeyExchange):
            exchange.compute_shared(bad)


@pytest.mark.parametrize(
    "u",
    [
        # Points of small order (RFC 7748 7): X25519 yields all zeros (RFC 8031 2.3).
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ],
)
def test_x25519_low_order_points_are_refused(u: str) -> None:
    exchange = DhExchange.generate(DhId.CURVE25519)
    with pytest.raises(InvalidKeyExchange):
        exchange.compute_shared(H(u))


def test_errors_and_repr_carry_no_key_material() -> None:
    group = DhId.ECP_256
    v = RFC5903[group]
    exchange = DhExchange.from_private_bytes(group, H(v["i"]))
    assert v["i"] not in repr(exchange).lower()
    assert repr(exchange) == "DhExchange(group=ECP_256)"
    bad = bytearray(H(v["grx"]) + H(v["gry"]))
    bad[-1] ^= 0x01
    with pytest.raises(InvalidKeyExchange) as info:
        exchange.compute_shared(bytes(bad))
    message = str(info.value).lower()
    assert v["grx"][:16] not in message
    assert bytes(bad).hex()[:16] not in message
    assert info.value.group == group


# --- hypothesis: arbitrary peer bytes only ever raise InvalidKeyExchange -------------------

_EXCHANGES = {group: DhExchange.generate(group) for group in SUPPORTED_DH_GROUPS}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    group=st.sampled_from(sorted(SUPPORTED_DH_GROUPS)),
    data=st.data(),
)
def test_compute_shared_on_random_bytes(group: int, data: st.DataObject) -> None:
    length = key_exchange_length(group)
    peer = data.draw(
        st.one_of(
            st.binary(min_size=length, max_size=length),
            st.binary(max_size=2 * length + 2),
        )
    )
    try:
        shared = _EXCHANGES[group].compute_shared(peer)
    except InvalidKeyExchange:
        return
    assert isinstance(shared, bytes)
    assert shared
