"""Choosing the kernel backend (services/kernel/backends.py): the probe's answer decides `auto`,
an explicit backend is taken as configured."""

from __future__ import annotations

import pytest

from ikefarm.services.kernel import backends


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[bool, str]]:
    """The probe's answer, set by the test (the kernel tier probes the real kernel)."""
    answer = {"value": (False, "kernel refused XFRM_MSG_NEWSA: Function not implemented")}
    monkeypatch.setattr(backends, "probe_esp", lambda netns=None: answer["value"])
    return answer


def test_auto_takes_netlink_when_the_kernel_takes_esp(probe: dict) -> None:  # type: ignore[type-arg]
    probe["value"] = (True, "the kernel took an ESP state (probe added and removed)")
    choice = backends.choose("auto")
    assert choice == backends.Choice(
        "netlink", "auto: the kernel took an ESP state (probe added and removed)"
    )


def test_auto_takes_userspace_when_the_kernel_refuses_esp(probe: dict) -> None:  # type: ignore[type-arg]
    assert backends.choose("auto") == backends.Choice(
        "userspace", "auto: kernel refused XFRM_MSG_NEWSA: Function not implemented"
    )


def test_explicit_backends_do_not_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(netns: str | None = None) -> tuple[bool, str]:
        raise AssertionError("probed")

    monkeypatch.setattr(backends, "probe_esp", no_probe)
    assert backends.choose("netlink") == backends.Choice("netlink", "configured")
    assert backends.choose("memory") == backends.Choice("memory", "configured")
    assert backends.choose("userspace") == backends.Choice("userspace", "configured")
    with pytest.raises(backends.BackendUnavailable, match="unknown kernel backend"):
        backends.choose("pfkey")
