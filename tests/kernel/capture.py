"""Capture the netlink requests an iproute2 command sends (strace's write dump).

This kernel refuses ESP states (`CONFIG_INET_ESP` off), but `ip xfrm state add`
still writes its complete XFRM request before the refusal comes back: strace
records it, so the test can compare our encoder with iproute2 byte for byte.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

_DUMP_LINE = re.compile(r"^\s*\d*\s*\|\s*([0-9a-f]{5})\s+((?:[0-9a-f]{2}\s{1,2})+)")
_BUFFER = re.compile(r"\* (\d+) bytes in buffer")


def strace_path() -> str | None:
    return shutil.which("strace")


def netlink_requests(netns: str, argv: Sequence[str], timeout: float = 10.0) -> list[bytes]:
    """Each buffer `argv` (run in `netns`) passed to sendmsg, in order.

    The command may fail (the kernel refusing the request is the point); only
    what it sent is returned.
    """
    strace = strace_path()
    assert strace is not None
    with tempfile.TemporaryDirectory(prefix="ikf-strace-") as tmp:
        out = Path(tmp) / "trace"
        subprocess.run(
            ["ip", "netns", "exec", netns, strace, "-f", "-qq", "-e", "trace=sendmsg",
             "-e", "write=all", "-o", str(out), *argv],
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
        text = out.read_text()
    buffers: list[bytes] = []
    current: bytearray | None = None
    expected = 0
    for line in text.splitlines():
        start = _BUFFER.search(line)
        if start:
            if current is not None:
                buffers.append(bytes(current))
            current, expected = bytearray(), int(start.group(1))
            continue
        match = _DUMP_LINE.match(line)
        if match and current is not None:
            current.extend(bytes.fromhex(match.group(2).replace(" ", "")))
    if current is not None:
        buffers.append(bytes(current))
    if buffers and len(buffers[-1]) != expected:
        raise AssertionError(f"strace dump of {len(buffers[-1])} octets, announced {expected}")
    return buffers


def without_seq_and_pid(request: bytes) -> bytes:
    """The request with its netlink sequence number and port id zeroed."""
    return request[:8] + bytes(8) + request[16:]
