"""Choosing the kernel backend (services/kernel/backends.py): the probe's answer decides `auto`,
and the userspace backend plugs in by module name when it exists."""

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


def test_auto_falls_to_userspace_refused_while_it_is_not_implemented(probe: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(backends.BackendUnavailable) as refused:
        backends.choose("auto")
    text = str(refused.value)
    assert "auto chose the userspace backend (kernel refused XFRM_MSG_NEWSA" in text
    assert "not implemented yet" in text and 'backend = "memory"' in text


def test_userspace_plugs_in_by_module_name(
    probe: dict,  # type: ignore[type-arg]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(backends.BackendUnavailable, match="userspace backend not implemented"):
        backends.choose("userspace")
    # a module providing the class (here a stand-in: the memory backend's module)
    monkeypatch.setattr(backends, "USERSPACE_MODULE", "ikefarm.services.kernel.memory")
    monkeypatch.setattr(backends, "USERSPACE_CLASS", "MemoryKernel")
    assert backends.choose("userspace") == backends.Choice("userspace", "configured")
    assert backends.choose("auto").backend == "userspace"
    assert backends.userspace_class().__name__ == "MemoryKernel"


def test_explicit_backends_do_not_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_probe(netns: str | None = None) -> tuple[bool, str]:
        raise AssertionError("probed")

    monkeypatch.setattr(backends, "probe_esp", no_probe)
    assert backends.choose("netlink") == backends.Choice("netlink", "configured")
    assert backends.choose("memory") == backends.Choice("memory", "configured")
    with pytest.raises(backends.BackendUnavailable, match="unknown kernel backend"):
        backends.choose("pfkey")
