"""The per-host lock on a farm's UDP endpoints (shared/udp_endpoints.py), with real flock."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ikefarm.shared.udp_endpoints import EndpointTaken, claim

A, B = "up farm-a", "up farm-b"


def test_members_of_one_farm_share_an_endpoint(tmp_path: Path) -> None:
    first = claim([("127.0.0.1", 500)], A, "a, first", tmp_path)
    second = claim([("127.0.0.1", 500)], A, "a, second", tmp_path)
    assert len(first) == len(second) == 1
    (path,) = first.paths()
    assert json.loads(path.read_text())["holder"] == "a, first"  # the farm's first member
    first.release()
    assert path.exists()  # the second member still holds it
    second.release()
    assert not path.exists()


def test_another_farm_is_refused_with_the_holder_named(tmp_path: Path) -> None:
    held = claim([("127.0.0.1", 500), ("127.0.0.1", 4500)], A, "ikefarm up pid 1", tmp_path)
    with pytest.raises(EndpointTaken) as refused:
        claim([("127.0.0.1", 4500)], B, "b", tmp_path)
    assert refused.value.endpoint == "127.0.0.1[4500]"
    assert "another ikefarm farm (ikefarm up pid 1)" in str(refused.value)
    held.release()
    claim([("127.0.0.1", 4500)], B, "b", tmp_path).release()  # free once A is gone


@pytest.mark.parametrize(
    ("ours", "theirs", "overlap"),
    [
        ("127.0.0.1", "127.0.0.2", False),
        ("0.0.0.0", "127.0.0.2", True),
        ("127.0.0.2", "0.0.0.0", True),
        ("::", "127.0.0.1", False),  # IPV6_V6ONLY: "::" leaves IPv4 alone
        ("::", "::1", True),
        ("0:0::1", "::1", True),  # one spelling per address
    ],
)
def test_addresses_overlap_when_equal_or_one_is_the_wildcard(
    tmp_path: Path, ours: str, theirs: str, overlap: bool
) -> None:
    held = claim([(theirs, 500)], A, "a", tmp_path)
    if overlap:
        with pytest.raises(EndpointTaken):
            claim([(ours, 500)], B, "b", tmp_path)
    else:
        claim([(ours, 500)], B, "b", tmp_path).release()
    claim([(ours, 501)], B, "b", tmp_path).release()  # another port never collides
    held.release()


def test_a_refused_claim_holds_none_of_its_endpoints(tmp_path: Path) -> None:
    held = claim([("127.0.0.1", 4500)], A, "a", tmp_path)
    with pytest.raises(EndpointTaken):
        claim([("127.0.0.1", 500), ("127.0.0.1", 4500)], B, "b", tmp_path)
    # farm B took 500 first and gave it back: A's second process may have it
    claim([("127.0.0.1", 500)], "up farm-c", "c", tmp_path).release()
    held.release()


HOLDER = """
import sys, time
from pathlib import Path
from ikefarm.shared.udp_endpoints import claim
claim([("127.0.0.1", 500)], "up farm-a", "ikefarm up pid in a child", Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""


def test_a_farm_that_died_leaves_nothing_that_blocks(tmp_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        with pytest.raises(EndpointTaken, match="ikefarm up pid in a child"):
            claim([("127.0.0.1", 500)], B, "b", tmp_path)
        child.send_signal(signal.SIGKILL)  # no cleanup at all
        child.wait(10)
        deadline = time.monotonic() + 5
        while True:  # the kernel drops the lock with the process
            try:
                held = claim([("127.0.0.1", 500)], B, "b", tmp_path)
                break
            except EndpointTaken:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert len(list(tmp_path.glob("*-500-127.0.0.1.*"))) == 1  # the dead farm's is gone
        held.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
