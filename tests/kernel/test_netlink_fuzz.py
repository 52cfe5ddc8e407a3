"""Hostile ChildInstall/TrapInstall fields into the netlink backend, programming a namespace:
a child is installed and deleted cleanly, or refused (InvalidChild / KernelRefusal), and
either way the kernel and the books are left empty. ESP states go to the recording stand-in
(EspStatesRecorded: this machine has none); policies go to the real kernel."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.proto.messages import TrapRemove
from ikefarm.services.kernel.memory import InvalidChild, KernelRefusal
from ikefarm.services.kernel.netlink import NetlinkKernel, NetlinkOptions
from tests.harness.netns import Namespace
from tests.kernel.test_netlink_backend import EspStatesRecorded, child, delete_of, trap

pytestmark = pytest.mark.kernel

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
selector = st.one_of(
    st.sampled_from(
        [
            "10.1.0.0/24",
            "10.1.0.1..10.1.0.9",
            "10.1.0.0/24[tcp/80]",
            "10.1.0.0/24[udp]",
            "10.1.0.0/24[tcp/1-9]",
            "0.0.0.0/0",
            "2001:db8::/64",
            "10.1.0.9..10.1.0.1",
            "[tcp]",
            "",
        ]
    ),
    st.text(max_size=24),
)
address = st.sampled_from(["192.0.2.1", "198.51.100.2", "2001:db8::1", "x", "0.0.0.0"])


def _leftovers(ns: Namespace, backend: NetlinkKernel) -> tuple[str, int, int, int]:
    policies = ns.run(["ip", "xfrm", "policy"]).stdout.strip()
    states = len(backend.xfrm.states)  # type: ignore[attr-defined]
    return policies, backend.child_count, backend.policy_count, states


@FUZZ
@given(
    local_ts=st.lists(selector, max_size=3),
    remote_ts=st.lists(selector, max_size=3),
    local=address,
    remote=address,
    mode=st.sampled_from(["tunnel", "transport", "beet"]),
    encr=st.integers(0, 40),
    integ=st.one_of(st.none(), st.integers(0, 20)),
    window=st.integers(-1, 5000),
    esn=st.booleans(),
    spi=st.binary(min_size=0, max_size=5),
)
def test_hostile_children_leave_nothing_behind(
    netns: Namespace,
    local_ts: list[str],
    remote_ts: list[str],
    local: str,
    remote: str,
    mode: str,
    encr: int,
    integ: int | None,
    window: int,
    esn: bool,
    spi: bytes,
) -> None:
    backend = NetlinkKernel(
        NetlinkOptions(), netns=netns.name, socket=EspStatesRecorded(netns.name)
    )
    request = child(
        local_ts=local_ts,
        remote_ts=remote_ts,
        local_address=local,
        remote_address=remote,
        mode=mode,
        encr_id=encr,
        integ_id=integ,
        replay_window=window,
        esn=esn,
        spi_in=spi,
    )

    async def run() -> None:
        try:
            await backend.install(request)
        except (InvalidChild, KernelRefusal):
            pass
        else:
            await backend.delete(delete_of(request))
        try:
            await backend.install_trap(
                dataclasses.replace(trap(), local_ts=local_ts, remote_ts=remote_ts, mode=mode)
            )
        except (InvalidChild, KernelRefusal):
            pass
        else:
            await backend.remove_trap(TrapRemove(vpn="hq", name="net", reqid=3))

    try:
        asyncio.run(run())
        assert _leftovers(netns, backend) == ("", 0, 0, 0)
    finally:
        backend.close()
