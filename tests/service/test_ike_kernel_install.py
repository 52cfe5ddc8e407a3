"""The ike worker's side of a child install: keys sealed, a restarted kernel service met.

A real ike worker and a real kernel service on a nats-server. The worker
fetches the kernel's transport key once and seals the child's keys to it; when
the kernel service restarts (a new transport key, an install that no longer
opens) the worker fetches the new key and seals again, once, and the child is
installed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ikefarm.services.ike.service import IkeService
from ikefarm.services.kernel.service import KernelService
from ikefarm.shared.bus.embedded import EmbeddedNats
from ikefarm.shared.bus.runtime import Runtime
from ikefarm.shared.config.loader import parse_config
from ikefarm.shared.ikev2.constants import EncrId
from ikefarm.shared.ikev2.effects import ChildSaInstall, Endpoint, InstallChildSa

# the test double: a kernel service here must not program the host (auto would)
MEMORY_BACKEND = '[kernel]\nbackend = "memory"\n'

ENCR_IN, ENCR_OUT = bytes(range(36)), bytes(range(100, 136))


def effect(unique_id: int) -> InstallChildSa:
    return InstallChildSa(
        ChildSaInstall(
            unique_id=unique_id,
            ike_unique_id=1,
            name="net",
            vpn="rw",
            reqid=unique_id,
            protocol="esp",
            mode="tunnel",
            local=Endpoint("192.0.2.1", 4500),
            remote=Endpoint("198.51.100.2", 4500),
            spi_in=bytes.fromhex(f"c00000{unique_id:02x}"),
            spi_out=bytes.fromhex(f"c10000{unique_id:02x}"),
            encr_id=EncrId.AES_GCM_16,
            encr_key_bits=256,
            integ_id=None,
            encr_key_in=ENCR_IN,
            encr_key_out=ENCR_OUT,
            integ_key_in=b"",
            integ_key_out=b"",
            esn=False,
            replay_window=32,
            udp_encap=True,
            local_ts=("10.100.0.0/24",),
            remote_ts=("10.200.0.0/24",),
        )
    )


@pytest.fixture
async def worker(nats_server: EmbeddedNats) -> AsyncIterator[Runtime]:
    runtime = Runtime(
        IkeService, parse_config(""), nats_server.url, instance="ike-0", options={"shard": 0}
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()


async def start_kernel(url: str) -> Runtime:
    runtime = Runtime(KernelService, parse_config(MEMORY_BACKEND), url, instance="kernel-k")
    await runtime.start()
    return runtime


async def test_a_restarted_kernel_service_gets_keys_sealed_to_its_new_key(
    nats_server: EmbeddedNats, worker: Runtime
) -> None:
    service = worker.service
    assert isinstance(service, IkeService)
    kernel = await start_kernel(nats_server.url)
    try:
        await service.install_child(effect(1))
        assert kernel.counters["child_install.ok"] == 1
        first_key = service.kernel_key._public
    finally:
        await kernel.stop()

    kernel = await start_kernel(nats_server.url)  # a new process: a new transport key
    try:
        await service.install_child(effect(2))
        assert kernel.counters["child_install.sealed_keys"] == 1  # sealed to the old key
        assert kernel.counters["child_install.ok"] == 1  # then to the new one
        assert service.kernel_key._public not in (None, first_key)
        backend = kernel.service.backend  # type: ignore[union-attr]
        assert {sa.encr_key_length for sa in backend.sad.values()} == {36}
    finally:
        await kernel.stop()
    assert worker.counters["kernel_install_refused"] == 1
    assert worker.counters["kernel_install_errors"] == 0
