"""Configuration of EAP via RADIUS (docs/radius.md): [[ike.radius-server]], [ike.radius]."""

from __future__ import annotations

from pathlib import Path

import pytest

from ikefarm.services.keystore.radius import servers_from_config
from ikefarm.shared.config.loader import ConfigError, parse_config
from ikefarm.shared.ikev2.policy import engine_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "examples" / "eap-radius.toml"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    return [str(p) for p in refused.value.problems]


def test_the_example_loads_with_defaults_and_its_secrets_stay_out_of_the_ike_view() -> None:
    config = parse_config(EXAMPLE.read_text())
    first, second = servers_from_config(config)
    assert (first.name, first.address, first.auth_port, first.acct_port) == (
        "radius-a", "198.51.100.10", 1812, 1813,
    )  # fmt: skip
    assert (second.timeout, second.retries, second.nas_identifier) == (2.0, 2, "ikefarm")
    assert first.secret.value == b"example-radius-secret"
    assert "example-radius-secret" not in repr(first)
    assert config.ike.radius.accounting and config.ike.radius.interim_interval == 600.0
    without = config.without_secrets()
    assert servers_from_config(without) == []  # an ike worker holds no RADIUS secret
    assert without.ike.radius_server[0].timeout == 2.0  # but knows how long to wait
    [vpn] = engine_policy(without).vpns
    assert vpn.remote_auth == "eap-radius" and vpn.vip_pools == ("radius",)


def test_eap_radius_needs_a_server_and_a_server_needs_address_and_secret() -> None:
    text = EXAMPLE.read_text()
    start = text.index("[[ike.radius-server]]")
    end = text.index("[ike.radius]\n")
    refused = problems(text[:start] + text[end:])
    assert refused == [
        'ike.vpn[0].ike-policy.remote-auth-method: "eap-radius" needs at least one '
        "[[ike.radius-server]]"
    ]
    broken = text.replace('address = "198.51.100.11"\n', "").replace(
        'secret = "0sZXhhbXBsZS1yYWRpdXMtc2VjcmV0"\n\n[ike.radius]', "\n[ike.radius]"
    )
    assert set(problems(broken)) == {
        "ike.radius-server[1].address: is required",
        "ike.radius-server[1].secret: is required",
    }


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("timeout = 2.0", "timeout = 0.01", "out of range"),
        ("retries = 2", "retries = 11", "out of range"),
        ('name = "radius-a"', 'name = "radius-a"\nauth-port = 0', "out of range"),
    ],
)
def test_server_ranges_are_enforced(key: str, value: str, words: str) -> None:
    text = EXAMPLE.read_text().replace(key, value, 1)
    assert any(words in p for p in problems(text))


def test_vip_pool_radius_needs_eap_radius() -> None:
    text = EXAMPLE.read_text().replace(
        'remote-auth-method = "eap-radius"', 'remote-auth-method = "pre-shared-key"'
    )
    assert any('"radius" takes the addresses' in p for p in problems(text))


def test_eap_as_initiator_is_still_refused() -> None:
    text = EXAMPLE.read_text().replace(
        'local-auth-method = "pre-shared-key"', 'local-auth-method = "eap-radius"'
    )
    assert any("not implemented yet (issue 15: EAP as initiator" in p for p in problems(text))
