"""[ike.logging] facilities reach syslog: a real Unix datagram socket, bound where a syslog
daemon binds /dev/log, receives what each facility is configured to get (seed 004)."""

from __future__ import annotations

import io
import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ikefarm.shared.observability import logging as ikelog
from ikefarm.shared.observability.logging import configure_logging, get_logger

LINE = re.compile(r"<(\d+)>\w{3} [ \d]\d \d\d:\d\d:\d\d ikefarm-(\w+)\[(\d+)\]: (\{.*\})$")


@pytest.fixture
def syslog_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "log")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(path)
    server.settimeout(0.5)
    try:
        yield path, server
    finally:
        server.close()
        configure_logging("test", "t", {}, stream=io.StringIO(), syslog_path=None)


def received(server: socket.socket) -> list[tuple[int, int, str, dict]]:
    """(facility, severity, service, line) of every datagram waiting."""
    found = []
    while True:
        try:
            data = server.recv(65536)
        except TimeoutError:
            return found
        match = LINE.match(data.decode())
        assert match, data
        pri = int(match.group(1))
        found.append((pri // 8, pri % 8, match.group(2), json.loads(match.group(4))))


def test_each_facility_gets_its_levels_with_its_syslog_facility(syslog_socket) -> None:  # type: ignore[no-untyped-def]
    path, server = syslog_socket
    stderr = io.StringIO()
    configure_logging(
        "ike",
        "ike-0",
        {"daemon": {"default": 0, "ike": 2}, "authpriv": {"default": 1, "ike": "disable"}},
        stream=stderr,
        syslog_path=path,
    )
    get_logger("ike").audit("ike_sa_established", vpn="rw")  # daemon
    get_logger("ike").debug("detail")  # daemon only (authpriv: ike disabled)
    get_logger("ike").raw("hexdump")  # nowhere
    get_logger("child").control("child_failed", psk="hunter2")  # authpriv only
    got = [(f, sev, svc, line["event"]) for f, sev, svc, line in received(server)]
    assert got == [
        (3, 5, "ike", "ike_sa_established"),  # daemon.notice
        (3, 7, "ike", "detail"),  # daemon.debug
        (10, 6, "ike", "child_failed"),  # authpriv.info
    ]
    # the JSON lines on stderr stay, line for line
    assert [json.loads(x)["event"] for x in stderr.getvalue().splitlines()] == [
        "ike_sa_established",
        "detail",
        "child_failed",
    ]


def test_no_secret_reaches_syslog_below_level_4(syslog_socket) -> None:  # type: ignore[no-untyped-def]
    path, server = syslog_socket
    configure_logging(
        "keystore", "k", {"daemon": {"default": 3}}, stream=io.StringIO(), syslog_path=path
    )
    get_logger("config").raw("dump", secret=b"hunter2", nested={"sk_d": "aabbcc"})
    ((facility, _sev, service, line),) = received(server)
    assert (facility, service) == (3, "keystore")
    assert line["secret"] == "<redacted>" and line["nested"]["sk_d"] == "<redacted>"
    assert "hunter2" not in json.dumps(line)


def test_level_4_is_announced_to_syslog_with_the_seeds_warning(syslog_socket) -> None:  # type: ignore[no-untyped-def]
    path, server = syslog_socket
    configure_logging(
        "ike", "i", {"authpriv": {"default": 4}}, stream=io.StringIO(), syslog_path=path
    )
    lines = [line for _f, _s, _svc, line in received(server)]
    assert any(
        line["event"] == "sensitive_logging_enabled" and "sensitive material" in line["warning"]
        for line in lines
    )


def test_without_a_syslog_socket_lines_go_to_stderr_only(tmp_path: Path) -> None:
    stderr = io.StringIO()
    configure_logging("ike", "i", {}, stream=stderr, syslog_path=str(tmp_path / "absent"))
    get_logger("ike").audit("ike_sa_established")
    assert json.loads(stderr.getvalue())["event"] == "ike_sa_established"
    assert ikelog._syslog is None


def test_a_syslog_that_cannot_take_a_line_drops_it_and_counts(syslog_socket) -> None:  # type: ignore[no-untyped-def]
    path, _server = syslog_socket
    configure_logging("ike", "i", {}, stream=io.StringIO(), syslog_path=path)
    before = ikelog.syslog_dropped
    get_logger("ike").audit("big", blob="x" * 300_000)  # larger than a datagram can be
    assert ikelog.syslog_dropped == before + 1
