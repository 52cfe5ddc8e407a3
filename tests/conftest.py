"""Fixtures every test tier shares: a real nats-server, config files, the ikefarm command."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from ikefarm.shared.bus.embedded import EmbeddedNats
from tests.harness.ports import udp_ports

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "ops" / "examples" / "psk-responder.toml"


@pytest.fixture
async def nats_client(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A plain client connection to `nats_server` (no credentials: the fixture has no auth)."""
    nc = await nats.connect(nats_server.url)
    yield nc
    await nc.close()


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A real nats-server with JetStream on a free loopback port, stopped after the test."""
    broker = EmbeddedNats(tmp_path / "nats")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def ikefarm_argv() -> list[str]:
    """How to run the `ikefarm` command from this venv."""
    return [sys.executable, "-m", "ikefarm.shared.cli.main"]


@pytest.fixture
def loopback_config(tmp_path: Path) -> Path:
    """The example responder moved to loopback, free ports and a private state dir."""
    # the memory test double: a test farm on the host's loopback must not program the host
    text = (
        EXAMPLE_CONFIG.read_text()
        .replace("192.0.2.1", "127.0.0.1")
        .replace('backend = "auto"', 'backend = "memory"')
    )
    ike_port, natt_port = udp_ports(2)
    text = text.replace(
        "[kernel]",
        f'[farm]\nstate-dir = "{tmp_path / "state"}"\n\n'
        f"[ingress]\nike-port = {ike_port}\nnatt-port = {natt_port}\n\n[kernel]",
    )
    path = tmp_path / "ikefarm.toml"
    path.write_text(text)
    return path


# the keystore refuses to start without a master key; every test farm (and the `ikefarm up`
# processes the tests start, which inherit the environment) uses this one
TEST_MASTER_KEY = "0x" + "6d61737465722d6b65792d666f722d74657374732d6f6e6c79"


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IKEFARM_LOG_LEVEL", raising=False)
    # a config without [farm] state-dir must not touch the machine's /var/lib/ikefarm
    monkeypatch.setenv("IKEFARM_STATE_DIR", str(tmp_path / "default-state"))
    monkeypatch.setenv("IKEFARM_MASTER_KEY", TEST_MASTER_KEY)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
