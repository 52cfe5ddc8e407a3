"""`ikefarm status` prints which worker holds which shard, own or adopted, with the lease age."""

from __future__ import annotations

from typing import Any

from ikefarm.shared.cli.status import ServiceRow, format_shards


def row(name: str, instance: str, gauges: Any) -> ServiceRow:
    return ServiceRow(name, instance, "0.1.0", 1.0, 0, 0, {}, gauges)


def test_shards_own_and_adopted_in_shard_order() -> None:
    rows = [
        row("ike", "ike-1", {"shard": 1, "lease_age": 0.5, "adopted_shards": []}),
        row(
            "ike",
            "ike-0",
            {
                "shard": 0,
                "lease_age": 1.2,
                "adopted_shards": [
                    {"shard": 2, "adopted_for": 13.5, "restored": 4, "lease_age": 0.4}
                ],
            },
        ),
        row("ingress", "ingress-0", {"shard": 7}),
    ]
    assert format_shards(rows).splitlines() == [
        "shard 0: ike-0 (own, lease age 1.2s)",
        "shard 1: ike-1 (own, lease age 0.5s)",
        "shard 2: ike-0 (adopted 13.5s ago, 4 SAs restored, lease age 0.4s)",
    ]


def test_odd_gauges_from_the_bus_are_skipped_or_shown_safely() -> None:
    rows = [
        row("ike", "ike-0", {"shard": "x"}),
        row("ike", "ike-1", {"shard": 1, "lease_age": None, "adopted_shards": "nope"}),
        row("ike", "ike-2", {"shard": 2, "adopted_shards": [{"shard": "3"}, 5, {"shard": 4}]}),
        row("ike", "ike-3", []),
    ]
    assert format_shards(rows).splitlines() == [
        "shard 1: ike-1 (own, lease age ?)",
        "shard 2: ike-2 (own, lease age ?)",
        "shard 4: ike-2 (adopted ? ago, None SAs restored, lease age ?)",
    ]
