"""Unique ids reserved in blocks in JetStream KV (a real nats-server): disjoint, never reused."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import nats
import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.client import Client

from ikefarm.proto import subjects
from ikefarm.services.ike import unique_ids
from ikefarm.services.ike.unique_ids import (
    BLOCK,
    SHARD_SPAN,
    UniqueIds,
    UnusableReservation,
    parse_record,
    reserve,
)
from ikefarm.shared.bus.auth import ensure_credentials, write_server_config
from ikefarm.shared.bus.embedded import EmbeddedNats

pytestmark = pytest.mark.timeout(60)


async def test_concurrent_reservations_of_one_shard_are_disjoint(nats_client: Client) -> None:
    kv = await unique_ids.open_bucket(nats_client)
    blocks = await asyncio.gather(*(reserve(kv, 3, 1) for _ in range(8)))
    assert all(end - start == BLOCK for start, end in blocks)
    ordered = sorted(blocks)
    assert all(a_end <= b_start for (_a, a_end), (b_start, _b) in itertools.pairwise(ordered))
    entry = await kv.get(subjects.unique_id_key(3))
    assert parse_record(entry.value) == ordered[-1][1]
    # another shard counts on its own
    assert await reserve(kv, 4, 1) == (1, 1 + BLOCK)


async def test_a_reservation_starts_above_what_was_handed_out_beyond_the_store(
    nats_client: Client,
) -> None:
    kv = await unique_ids.open_bucket(nats_client)
    await reserve(kv, 5, 1)
    start, _end = await reserve(kv, 5, 50_000)
    assert start == 50_000


@pytest.mark.parametrize("record", [b"", b"x", b"-5", b"0", b"12345678901", b"1e9", b"\xff"])
async def test_a_record_that_is_not_a_counter_is_refused_never_guessed(
    nats_client: Client, record: bytes
) -> None:
    kv = await unique_ids.open_bucket(nats_client)
    await kv.put(subjects.unique_id_key(6), record)
    with pytest.raises(UnusableReservation, match="is not a counter"):
        await reserve(kv, 6, 1)
    assert ((await kv.get(subjects.unique_id_key(6))).value or b"") == record  # left as it was


async def test_keep_reserved_refills_the_spare_while_ids_are_taken(nats_client: Client) -> None:
    kv = await unique_ids.open_bucket(nats_client)
    wanted = asyncio.Event()
    ids = UniqueIds(7, on_want=wanted.set)
    ids.add_block(*await reserve(kv, 7, 1))

    class Log:
        def control(self, *_args: object, **_fields: object) -> None:
            raise AssertionError("no reservation may fail here")

    keeper = asyncio.create_task(unique_ids.keep_reserved(kv, ids, wanted, Log()))
    try:
        taken = []
        for _ in range(3 * BLOCK):
            taken.append(ids.take())
            if ids.wants_block:
                await asyncio.sleep(0)
            while ids._spare is None and ids.wants_block:
                await asyncio.sleep(0.01)
        assert len(set(taken)) == len(taken)
        assert ids.overrun == 0
        assert all(7 * SHARD_SPAN < i < 8 * SHARD_SPAN for i in taken)
    finally:
        keeper.cancel()


def test_ids_run_on_past_the_blocks_when_the_store_is_away() -> None:
    wants: list[int] = []
    ids = UniqueIds(0, on_want=lambda: wants.append(1))
    ids.add_block(1, 1 + BLOCK)
    taken = [ids.take() for _ in range(BLOCK + 10)]
    assert taken == list(range(1, BLOCK + 11))
    assert ids.overrun == 10 and wants
    assert ids.high_water == BLOCK + 11  # the next reservation starts above


@given(st.binary(max_size=16))
def test_parse_record_takes_only_a_counter(raw: bytes) -> None:
    try:
        value = parse_record(raw)
    except ValueError:
        return
    assert raw.isdigit() and 0 < value <= SHARD_SPAN and int(raw) == value


async def test_only_the_ike_user_may_reserve_unique_ids(tmp_path: Path) -> None:
    users = ensure_credentials(tmp_path / "auth")
    config = write_server_config(tmp_path / "auth", users)
    with EmbeddedNats(tmp_path / "nats", config_file=config) as broker:
        errors: dict[str, list[str]] = {"ike": [], "ingress": []}
        for user, refusals in errors.items():
            credentials = users[user]

            async def on_error(exc: Exception, refusals: list[str] = refusals) -> None:
                refusals.append(str(exc))

            nc = await nats.connect(
                broker.url,
                user=credentials.user,
                password=credentials.password,
                inbox_prefix=subjects.inbox_prefix(credentials.user),
                error_cb=on_error,
            )
            try:
                if user == "ike":
                    kv = await unique_ids.open_bucket(nc)
                    assert await reserve(kv, 0, 1) == (1, 1 + BLOCK)
                    assert await reserve(kv, 0, 1) == (1 + BLOCK, 1 + 2 * BLOCK)
                else:
                    with pytest.raises(Exception):  # noqa: B017 - refused by the broker
                        kv = await asyncio.wait_for(unique_ids.open_bucket(nc), 5)
                        await asyncio.wait_for(reserve(kv, 0, 1), 5)
            finally:
                await nc.close()
    assert errors["ike"] == []
    assert any("permissions violation" in e.lower() for e in errors["ingress"]), errors
