"""Record every message on a NATS bus (`>`), for tests that look for what must not travel.

Run as a script inside the namespace of an `ikefarm up` (its embedded broker
listens on that namespace's loopback):

    python tests/harness/bus_capture.py NATS_URL OUTFILE

It subscribes to `>`, writes "ready" to OUTFILE.ready once the server holds
the subscription, then appends one msgpack record per message (subject,
reply subject, headers, data) to OUTFILE, flushed each time, until SIGTERM.
`BusCapture` drives it from a test.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack


async def _capture(url: str, out_path: Path) -> None:
    import nats

    from ikefarm.shared.bus.runtime import subscriptions_in_place

    nc = await nats.connect(url, name="bus-capture")
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    with out_path.open("wb") as out:

        async def on_message(msg: Any) -> None:
            record = {
                "subject": msg.subject,
                "reply": msg.reply or "",
                "headers": dict(msg.headers or {}),
                "data": bytes(msg.data),
            }
            out.write(msgpack.packb(record))
            out.flush()

        await nc.subscribe(">", cb=on_message)
        await subscriptions_in_place(nc)  # flush() proves nothing about SUBs
        Path(str(out_path) + ".ready").write_text("ready")
        await stop.wait()
        await nc.flush()
        await asyncio.sleep(0.2)  # deliveries already on their way
    await nc.close()


class BusCapture:
    """The recorder in `ns`, on the broker of the `ikefarm up` whose state dir is given."""

    def __init__(self, ns: Any, state_dir: Path, out_path: Path) -> None:
        self.ns = ns
        self.url = json.loads((Path(state_dir) / "up.json").read_text())["nats_url"]
        self.out_path = Path(out_path)
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 10.0) -> BusCapture:
        from tests.harness.netns import wait_for

        ready = Path(str(self.out_path) + ".ready")
        self.proc = self.ns.popen([sys.executable, __file__, self.url, str(self.out_path)])
        wait_for(ready.exists, timeout=timeout, what="bus capture subscribed to >")
        return self

    def stop(self) -> list[dict[str, Any]]:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)
            self.proc = None
        return self.records()

    def records(self) -> list[dict[str, Any]]:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(self.out_path.read_bytes())
        return list(unpacker)

    def blob(self) -> bytes:
        """Every subject, header and payload recorded, as one searchable byte string."""
        parts = []
        for record in self.records():
            parts += [record["subject"].encode(), record["reply"].encode(), record["data"]]
            parts += [f"{k}={v}".encode() for k, v in record["headers"].items()]
        return b"\n".join(parts)


if __name__ == "__main__":
    asyncio.run(_capture(sys.argv[1], Path(sys.argv[2])))
