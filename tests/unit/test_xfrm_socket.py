"""The socket-option body of `shared/xfrm_socket.py`: the kernel's 168-octet
`struct xfrm_userpolicy_info`, zero but for the selector's family, direction and action."""

from __future__ import annotations

import socket
import struct

import pytest

from ikefarm.shared import xfrm_socket
from ikefarm.shared.xfrm_socket import USERPOLICY_INFO_SIZE, bypass_policies, userpolicy_info

# offsets in the kernel's layout: selector family after the two addresses and four ports,
# dir and action after selector (56), lifetimes (64 + 32), priority and index
FAMILY_AT, DIR_AT, ACTION_AT = 40, 160, 161


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
@pytest.mark.parametrize("direction", [xfrm_socket.XFRM_POLICY_IN, xfrm_socket.XFRM_POLICY_OUT])
def test_body_sets_only_family_direction_and_action(family: int, direction: int) -> None:
    body = userpolicy_info(family, direction, action=1)
    assert len(body) == USERPOLICY_INFO_SIZE == 168
    assert struct.unpack_from("=H", body, FAMILY_AT)[0] == family
    assert (body[DIR_AT], body[ACTION_AT]) == (direction, 1)
    rest = bytearray(body)
    rest[FAMILY_AT : FAMILY_AT + 2] = b"\0\0"
    rest[DIR_AT] = rest[ACTION_AT] = 0
    assert rest == bytes(168)


def test_allow_is_the_default_action() -> None:
    assert userpolicy_info(socket.AF_INET, xfrm_socket.XFRM_POLICY_OUT)[ACTION_AT] == 0


def test_a_socket_of_another_family_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b, pytest.raises(ValueError, match="address family"):
        bypass_policies(a)
