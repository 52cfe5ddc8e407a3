"""The handshake load generator (ops/bench/loadgen.py) against a real `ikefarm up`.

A tiny run of the benchmark's own parts (ops/bench/handshake.py): the farm as the
benchmark configures it, one generator process in the peer namespace making full
handshakes and keeping them, one sending IKE_SA_INIT probes. Behaviour only: every
handshake completes with its child, the farm shows them, every probe is answered
with an SA; how fast is the benchmark's business, not the test's.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ops.bench.handshake import ikefarm_responder, phase
from tests.harness.netns import NetnsPair

pytestmark = [pytest.mark.interop, pytest.mark.slow]

FULL, PROBE = "192.0.2.2", "192.0.2.11"


def test_generator_completes_handshakes_and_probes_against_a_farm(
    netns_pair: NetnsPair, tmp_path: Path
) -> None:
    netns_pair.peer.add_address(netns_pair.link.if_b, f"{PROBE}/24")
    farm = ikefarm_responder(netns_pair.gw, tmp_path / "farm", workers=1)
    farm.start_fn()
    try:
        full, held = phase(netns_pair.peer, [FULL], farm, "full", rate=5, duration=1.0, keep=True)
        try:
            assert full["sent"] == 5
            assert full["answered"] == 5, full
            assert full["established"] == 5 and full["with_child"] == 5
            assert full["unanswered"] == 0 and not full["errors"]
            gateway = farm.gateway()
            # the generator's warm-up handshake and the five, each with its child, on the farm
            rows = gateway.wait_sas(6)
            assert all(row["children"] for row in rows)
        finally:
            assert held is not None
            held.stop()

        probe, _ = phase(netns_pair.peer, [PROBE], farm, "init", rate=20, duration=1.0)
        assert probe["sent"] == 20
        assert probe["answered"] == 20, probe
        assert probe["refused"] == 0 and probe["unanswered"] == 0
        assert probe["cpu_us_per_answer"] is None or probe["cpu_us_per_answer"] > 0
    finally:
        farm.stop_fn()
