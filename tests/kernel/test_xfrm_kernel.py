"""XFRM programmed for real through services/kernel/xfrm.py in a namespace, read back by `ip`."""

from __future__ import annotations

import errno
import re
import select

import pytest

from ikefarm.services.kernel import xfrm
from tests.harness.netns import Namespace

pytestmark = pytest.mark.kernel

SELECTOR = xfrm.Selector("10.1.0.0/24", "10.2.0.0/16")
TEMPLATE_OUT = xfrm.Template("192.0.2.1", "192.0.2.2", reqid=7)
TEMPLATE_IN = xfrm.Template("192.0.2.2", "192.0.2.1", reqid=7)
REVERSE = xfrm.Selector("10.2.0.0/16", "10.1.0.0/24")


def _policies(ns: Namespace) -> str:
    return ns.run(["ip", "xfrm", "policy", "show"]).stdout


def test_policies_in_out_fwd_with_priority_and_reqid_templates(
    netns: Namespace, xfrm_socket: xfrm.XfrmSocket
) -> None:
    xfrm_socket.add_policy(xfrm.PolicySpec(SELECTOR, "out", 1500, (TEMPLATE_OUT,)))
    xfrm_socket.add_policy(xfrm.PolicySpec(REVERSE, "in", 1500, (TEMPLATE_IN,)))
    xfrm_socket.add_policy(xfrm.PolicySpec(REVERSE, "fwd", 1500, (TEMPLATE_IN,)))
    shown = _policies(netns)
    for direction, (src, dst), (tsrc, tdst) in (
        ("out", ("10.1.0.0/24", "10.2.0.0/16"), ("192.0.2.1", "192.0.2.2")),
        ("in", ("10.2.0.0/16", "10.1.0.0/24"), ("192.0.2.2", "192.0.2.1")),
        ("fwd", ("10.2.0.0/16", "10.1.0.0/24"), ("192.0.2.2", "192.0.2.1")),
    ):
        block = re.search(
            rf"src {src} dst {dst} \n\s+dir {direction} priority 1500 ptype main \n"
            rf"\s+tmpl src {tsrc} dst {tdst}\n\s+proto esp reqid 7 mode tunnel",
            shown,
        )
        assert block, f"{direction} policy not shown as programmed:\n{shown}"

    xfrm_socket.add_policy(xfrm.PolicySpec(SELECTOR, "out", 900, (TEMPLATE_OUT,)), update=True)
    assert "dir out priority 900" in _policies(netns)

    for selector, direction in ((SELECTOR, "out"), (REVERSE, "in"), (REVERSE, "fwd")):
        xfrm_socket.delete_policy(selector, direction)
    assert _policies(netns).strip() == ""


def test_policy_with_ports_mark_and_if_id_reads_back(
    netns: Namespace, xfrm_socket: xfrm.XfrmSocket
) -> None:
    selector = xfrm.Selector("10.1.0.0/24", "10.2.0.0/16", proto=6, dport=443)
    spec = xfrm.PolicySpec(
        selector, "out", 10, (TEMPLATE_OUT,), mark=xfrm.Mark(0x20, 0xF0), if_id=33
    )
    xfrm_socket.add_policy(spec)
    shown = _policies(netns)
    assert "proto tcp dport 443" in shown
    assert "mark 0x20/0xf0" in shown
    assert "if_id 0x21" in shown
    xfrm_socket.delete_policy(selector, "out", mark=spec.mark, if_id=33)
    assert _policies(netns).strip() == ""


def test_duplicate_policy_is_refused_with_the_kernel_text(xfrm_socket: xfrm.XfrmSocket) -> None:
    spec = xfrm.PolicySpec(SELECTOR, "out", 1, (TEMPLATE_OUT,))
    xfrm_socket.add_policy(spec)
    with pytest.raises(xfrm.XfrmError) as refused:
        xfrm_socket.add_policy(spec)
    assert refused.value.errno == errno.EEXIST
    assert "kernel refused XFRM_MSG_NEWPOLICY: File exists (EEXIST)" in str(refused.value)


def test_spd_hash_thresholds_read_back_with_iproute2(
    netns: Namespace, xfrm_socket: xfrm.XfrmSocket
) -> None:
    xfrm_socket.set_spd_hash((24, 16), (64, 56))
    shown = netns.run(["ip", "-s", "-s", "xfrm", "policy", "count"]).stdout
    assert "SPD IPv4 thresholds: local 24 remote 16" in shown
    assert "SPD IPv6 thresholds: local 64 remote 56" in shown
    assert xfrm_socket.get_spdinfo() == xfrm.SpdInfo((24, 16), (64, 56))


def test_esp_state_is_installed_or_refused_with_the_kernel_reason(
    netns: Namespace, xfrm_socket: xfrm.XfrmSocket
) -> None:
    """This machine has no ESP (`CONFIG_INET_ESP` off): the refusal names the kernel's errno.

    On a kernel with ESP the same request installs the SA, read back with iproute2
    and through XFRM_MSG_GETSA.
    """
    spec = xfrm.SaSpec(
        "192.0.2.1",
        "192.0.2.2",
        0xC0FFEE01,
        7,
        aead=xfrm.Algorithm("rfc4106(gcm(aes))", bytes(range(20)), 128),
        esn=True,
        replay_window=128,
    )
    try:
        xfrm_socket.add_sa(spec)
    except xfrm.XfrmError as refused:
        assert refused.errno in (errno.ENOSYS, errno.EPROTONOSUPPORT, errno.ENOENT)
        assert str(refused).startswith("kernel refused XFRM_MSG_NEWSA: ")
        assert errno.errorcode[refused.errno] in str(refused)
        assert bytes(range(20)).hex() not in str(refused)
        assert netns.run(["ip", "xfrm", "state"]).stdout.strip() == ""
        return
    shown = netns.run(["ip", "xfrm", "state"]).stdout
    assert "spi 0xc0ffee01 reqid 7 mode tunnel" in shown
    sa = xfrm_socket.get_sa("192.0.2.1", "192.0.2.2", 0xC0FFEE01)
    assert (sa.spi, sa.reqid, sa.esn_window) == (0xC0FFEE01, 7, 128)
    xfrm_socket.delete_sa("192.0.2.1", "192.0.2.2", 0xC0FFEE01)


def test_deleting_a_missing_sa_is_refused(xfrm_socket: xfrm.XfrmSocket) -> None:
    with pytest.raises(xfrm.XfrmError) as refused:
        xfrm_socket.delete_sa("192.0.2.1", "192.0.2.2", 0x1234)
    assert refused.value.errno == errno.ESRCH


def test_trap_policy_raises_an_acquire_event(
    netns: Namespace, xfrm_socket: xfrm.XfrmSocket
) -> None:
    """A policy with a template and no SA: the first packet makes the kernel ask for one."""
    netns.run(["ip", "link", "add", "v0", "type", "veth", "peer", "name", "v1"])
    for argv in (
        ["ip", "link", "set", "v0", "up"],
        ["ip", "link", "set", "v1", "up"],
        ["ip", "addr", "add", "10.1.0.1/24", "dev", "v0"],
        ["ip", "route", "add", "10.2.0.0/16", "dev", "v0"],
    ):
        netns.run(argv)
    events = xfrm.XfrmEvents(netns.name)
    try:
        xfrm_socket.add_policy(xfrm.PolicySpec(SELECTOR, "out", 100, (TEMPLATE_OUT,)))
        netns.ping("10.2.0.1", timeout=1.0)  # no answer: the packet waits for an SA
        got: list[xfrm.Acquire | xfrm.Expire] = []
        for _ in range(20):
            if got:
                break
            select.select([events], [], [], 0.25)
            got.extend(events.read())
        acquires = [e for e in got if isinstance(e, xfrm.Acquire)]
        assert acquires, "no XFRM_MSG_ACQUIRE after traffic hit the trap policy"
        first = acquires[0]
        assert (first.src, first.dst, first.reqid, first.protocol) == (
            "192.0.2.1",
            "192.0.2.2",
            7,
            xfrm.IPPROTO_ESP,
        )
        assert first.selector_src == "10.1.0.1/32"
        assert first.selector_dst == "10.2.0.1/32"
        assert first.policy_dir == xfrm.XFRM_POLICY_OUT
        assert events.malformed == 0
        # the larval (acquire) state the kernel keeps meanwhile shows in a dump, SPI 0
        larval = [sa for sa in xfrm_socket.dump_sas() if sa.reqid == 7]
        assert larval and larval[0].spi == 0
    finally:
        events.close()


def test_backend_probe_answers_from_the_kernel_and_leaves_nothing(netns: Namespace) -> None:
    from ikefarm.services.kernel.backends import probe_esp

    accepted, why = probe_esp.__wrapped__(netns.name)  # not the per-process cached answer
    if accepted:
        assert why == "the kernel took an ESP state (probe added and removed)"
    else:
        assert why.startswith("kernel refused XFRM_MSG_NEWSA: "), why
    assert netns.run(["ip", "xfrm", "state"]).stdout.strip() == ""
