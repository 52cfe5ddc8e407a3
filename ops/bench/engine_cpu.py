"""Engine-only CPU per answered IKE_SA_INIT and per full responder handshake (process time).

No bus and no services: two sans-I/O engines joined by the test wire
(tests/engine_helpers.py), only the responder's calls timed. It isolates the engine's
share of `ops/bench/handshake`'s "ike" column, for comparing commits on a shared
machine. With no argument it runs this checkout; with a folder holding an `ikefarm/`
export of another commit (`mkdir -p /tmp/old/ikefarm && git archive REV | tar -x -C
/tmp/old/ikefarm`) it runs that one: run both, interleaved, and compare.

    .venv/bin/python ops/bench/engine_cpu.py [/tmp/old]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REQUESTS = 400  # IKE_SA_INIT answered per run
RUNS = 3
HANDSHAKES = 300


def _select_tree() -> str:
    if len(sys.argv) > 1:
        root = sys.argv[1]
        # leave the editable install's finder out: `ikefarm` then comes from `root`
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f)]
        sys.path[:0] = [root, root + "/ikefarm"]
        return root
    root = str(Path(__file__).resolve().parents[2])
    sys.path.insert(0, root)
    return root


def main() -> None:
    root = _select_tree()
    from ikefarm.shared.ikev2 import engine as engine_module
    from ikefarm.shared.ikev2.effects import Endpoint, SendDatagram
    from tests.engine_helpers import Nat, pair

    wire = pair()
    initiator, responder = wire.initiator.engine, wire.responder.engine

    def forget_initiator_sas() -> None:
        for spi in list(initiator.sas):
            initiator.sas.pop(spi)

    requests = []
    for _ in range(REQUESTS * RUNS):
        effects = initiator.initiate("hq", "net", wire.now)
        requests.append(next(e.data for e in effects if isinstance(e, SendDatagram)))
        forget_initiator_sas()
    per_answer = []
    local = Endpoint("192.0.2.1", 500)
    for run in range(RUNS):
        started = time.process_time()
        for i, data in enumerate(requests[run * REQUESTS : (run + 1) * REQUESTS]):
            remote = Endpoint(f"10.{run}.{i // 250}.{i % 250 + 1}", 500)
            responder.receive(data, local, remote, 1000.0)
        per_answer.append(round((time.process_time() - started) / REQUESTS * 1e6))
    for spi in list(responder.sas):
        responder.sas.pop(spi)
    responder.init_index.clear()

    spent = [0.0]

    def timed(call: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return call(*args, **kwargs)
            finally:
                spent[0] += time.process_time() - started

        return wrapper

    responder.receive = timed(responder.receive)  # type: ignore[method-assign]
    responder.keystore_reply = timed(responder.keystore_reply)  # type: ignore[method-assign]
    for i in range(HANDSHAKES):
        wire.now += 0.01
        wire.nat = Nat(f"198.51.{100 + i // 250}.{i % 250 + 1}")
        wire.run(initiator.initiate("hq", "net", wire.now), wire.initiator)
        wire.initiator.effects.clear()
        wire.responder.effects.clear()
        wire.log.clear()
        forget_initiator_sas()
    print(
        f"{engine_module.__file__.removesuffix('/shared/ikev2/engine.py')} ({root}): "
        f"responder engine us per IKE_SA_INIT answer, {RUNS} runs: {per_answer}; "
        f"per full handshake: {spent[0] / HANDSHAKES * 1e6:.0f} "
        f"({len(responder.sas)} established)"
    )


if __name__ == "__main__":
    main()
