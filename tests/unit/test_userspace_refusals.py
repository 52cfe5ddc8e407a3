"""What the userspace backend cannot do yet is refused with "not implemented", never ignored.

At configuration check (`ikefarm config check`, and `ikefarm up` before anything
starts) for the configuration options, and per child SA (`KernelAck` error,
counted as `child_install.not_implemented`) for what a negotiation produced.
Refused installs leave nothing behind.
"""

from __future__ import annotations

import dataclasses

import pytest

from ikefarm.services.kernel.memory import KernelRefusal
from ikefarm.services.kernel.service import KernelService
from ikefarm.services.kernel.userspace import UserspaceKernel
from ikefarm.shared.config.loader import USERSPACE_NOT_IMPLEMENTED, ConfigError, parse_config
from ikefarm.shared.ikev2.constants import EncrId
from tests.service.test_kernel_memory import ENCR_KEY_IN, ENCR_KEY_OUT, child

BASE = """
[kernel]
backend = "userspace"
[[ike.pre-shared-key]]
secret = "refusal-test-secret"
[[ike.ipsec-policy-template]]
name = "ipsecpol"
{template}
[[ike.ipsec-policy-template.esp-proposal]]
aead-alg = ["aes256-gcm-128"]
[[ike.vpn]]
name = "hq"
local-address = "192.0.2.1"
remote-address = "192.0.2.2"
ipsec-policy = {{ template = "ipsecpol" }}
[[ike.vpn.security-policy]]
name = "net"
local-ts = {{ subnet = "10.100.0.0/24" }}
remote-ts = {{ subnet = "10.200.0.0/24" }}
{policy}
"""


def config(template: str = "", policy: str = "", top: str = "") -> str:
    return top + BASE.format(template=template, policy=policy)


def test_a_plain_userspace_configuration_passes() -> None:
    KernelService.preflight(parse_config(config()))


@pytest.mark.parametrize(
    ("text", "path"),
    [
        (config(policy='mode = "transport"'), "ike.vpn[0].security-policy[0].mode"),
        (config(policy="svti-id-in = 5\nsvti-id-out = 6"), "security-policy[0].svti-id-in"),
        (
            config(policy='[ike.vpn.security-policy.inject-routes]\nnext-hop = "192.0.2.254"'),
            "security-policy[0].inject-routes",
        ),
        (
            config(top="[ike.global-options.sp-hash-ipv4]\nlocal = 24\n"),
            "ike.global-options.sp-hash-ipv4",
        ),
    ],
)
def test_options_the_userspace_backend_lacks_are_refused_at_config_check(
    text: str, path: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(text)
    (problem,) = refused.value.problems
    assert path in problem.path and problem.message.startswith(USERSPACE_NOT_IMPLEMENTED)
    # the same options with the memory backend (a test double that protects nothing) pass
    parse_config(text.replace('backend = "userspace"', 'backend = "memory"'))


def test_trap_actions_are_accepted_with_the_userspace_backend() -> None:
    """The dataplane raises ACQUIRE for traps now (docs/esp-dataplane.md)."""
    parse_config(config(template='dpd-action = "trap"\nstart-action = "trap"'))


def opened(**changes: object) -> object:
    keys = {"encr_key_in": ENCR_KEY_IN, "encr_key_out": ENCR_KEY_OUT}
    return dataclasses.replace(child(), **{**keys, **changes})


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mode": "transport", "local_ts": [], "remote_ts": []}, "transport mode"),
        ({"local_ts": ["10.100.0.0/24[tcp/80]"]}, "protocol/port"),
        ({"encr_id": EncrId.AES_CCM_16}, "ESP transform"),
        ({"remote_ts": ["0.0.0.0/0"]}, "covers the peer's own address (198.51.100.2)"),
    ],
)
def test_children_the_dataplane_lacks_are_refused_and_leave_nothing(
    changes: dict[str, object], named: str
) -> None:
    backend = UserspaceKernel()  # not started: a refused child touches no device
    with pytest.raises(KernelRefusal) as refused:
        backend.install(opened(**changes))  # type: ignore[arg-type]
    assert refused.value.code == "not_implemented"
    assert refused.value.text.startswith("not implemented") and named in refused.value.text
    assert backend.sad == {} and backend.child_count == 0 and len(backend.dataplane) == 0
