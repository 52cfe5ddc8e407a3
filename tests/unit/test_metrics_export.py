"""Metric families from a stats snapshot, and the listen address option (no sockets)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ikefarm.proto.messages import Stats
from ikefarm.shared.config.kinds import (
    ListenAddressError,
    ListenEndpoint,
    ValueRefused,
    parse_listen,
)
from ikefarm.shared.observability.metrics import METRIC_NAMES, MetricsExport, prometheus_name


def exposition(stats: Stats) -> str:
    """What the OpenTelemetry Prometheus exporter of a service answers for one snapshot."""
    export = MetricsExport(stats.service, stats.instance, stats.version, source=lambda: stats)
    try:
        return export.exposition()
    finally:
        export.close()


def stats(counters: dict, gauges: dict) -> Stats:  # type: ignore[type-arg]
    return Stats("ingress", "ingress-0", "0.1.0", 1.5, 4, 1, counters, gauges)


def test_gauges_flatten_lists_count_and_text_is_a_label() -> None:
    text = exposition(
        stats(
            {"gate.dropped.limit.ike-sa-limit": 2},
            {
                "owned_shards": [0, 1, 4],
                "owners_learning": False,
                "dos": {"cookie_mode": "threshold", "half_open": 9, "cookie_secret_version": None},
            },
        )
    )
    assert (
        'ikefarm_state{ikefarm_instance="ingress-0",name="owned_shards",service="ingress"} 3.0'
        in text
    )
    assert 'name="owners_learning",service="ingress"} 0.0' in text
    assert 'name="dos.half_open",service="ingress"} 9.0' in text
    assert (
        'ikefarm_state_info{ikefarm_instance="ingress-0",name="dos.cookie_mode",'
        'service="ingress",value="threshold"} 1.0'
    ) in text
    assert "cookie_secret_version" not in text  # None is no value
    assert 'event="gate.dropped.limit.ike-sa-limit"' in text
    assert "ikefarm_bus_requests_total" in text


@given(
    counters=st.dictionaries(st.text(max_size=20), st.integers(0, 2**63)),
    gauges=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
        ),
        max_leaves=12,
    ).filter(lambda g: isinstance(g, dict))
    | st.dictionaries(st.text(max_size=8), st.integers(), max_size=3),
)
def test_any_stats_export_under_the_declared_names(counters, gauges) -> None:  # type: ignore[no-untyped-def]
    text = exposition(stats(counters, gauges))
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names <= METRIC_NAMES
    # every counter came through, whatever its name
    events = {
        s.labels["event"]
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "ikefarm_events_total"
    }
    assert events == set(counters)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("[::1]:9464", ("::1", 9464)),
        ("[2001:db8::1]:65535", ("2001:db8::1", 65535)),
    ],
)
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "9464",
        ":9464",
        "localhost:9464",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:x",
        "::1:9464",
        "[127.0.0.1]:9464",
        "127.0.0.1:",
    ],
)
def test_bad_listen_addresses_are_refused(text: str) -> None:
    with pytest.raises(ListenAddressError):
        parse_listen(text)
    with pytest.raises(ValueRefused):
        ListenEndpoint().parse(text)


def test_listen_is_off_unless_configured() -> None:
    assert ListenEndpoint().parse("") == ""
    with pytest.raises(ValueRefused):
        ListenEndpoint().parse(9464)


def test_up_gives_each_process_its_own_metrics_port(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from ikefarm.shared.cli.supervisor import plan_children
    from ikefarm.shared.config.loader import load_config

    path = tmp_path / "farm.toml"
    path.write_text('[farm]\nike-workers = 2\n[telemetry]\nmetrics-listen = "127.0.0.1:65533"\n')
    children = plan_children(load_config(path), str(path), "nats://127.0.0.1:4222")
    given = [
        c.argv[c.argv.index("--metrics-listen") + 1] if "--metrics-listen" in c.argv else None
        for c in children
    ]
    # ingress, ike x2, keystore, kernel, flow: consecutive ports while there are ports
    assert given == ["127.0.0.1:65533", "127.0.0.1:65534", "127.0.0.1:65535", None, None, None]


def test_latency_histograms_are_cumulative_and_bounded() -> None:
    from ikefarm.shared.observability.latency import (
        BUS_REQUEST_DURATION,
        IKE_HANDSHAKE_DURATION,
        MAX_HISTOGRAM_LABELS,
        Latencies,
    )

    latencies = Latencies()
    latencies.observe(IKE_HANDSHAKE_DURATION, 0.2)  # no meter yet: nothing recorded
    export = MetricsExport("ike", "ike-0", "0", latencies, source=lambda: None)
    for seconds in (0.0005, 0.003, 0.003, 42.0, -1.0):
        latencies.observe(BUS_REQUEST_DURATION, seconds, "ikefarm.keystore.psk.auth")
    latencies.observe(IKE_HANDSHAKE_DURATION, 0.2)
    latencies.observe("not_declared", 1.0)  # never exported
    for n in range(MAX_HISTOGRAM_LABELS + 5):
        latencies.observe(BUS_REQUEST_DURATION, 0.01, f"s{n}")
    assert latencies.dropped == 6  # the keystore subject took one of the label slots

    try:
        text = export.exposition()
    finally:
        export.close()
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert {s.name for s in samples} <= METRIC_NAMES
    keystore = {
        s.labels.get("le", s.name.rsplit("_", 1)[-1]): s.value
        for s in samples
        if s.labels.get("subject") == "ikefarm.keystore.psk.auth"
    }
    assert keystore["0.001"] == 2  # 0.0005 and the negative one
    assert keystore["0.005"] == 4
    assert keystore["10.0"] == 4 and keystore["+Inf"] == 5
    assert keystore["count"] == 5
    handshake = [s for s in samples if s.name == "ikefarm_ike_handshake_duration_seconds_count"]
    assert [s.value for s in handshake] == [1]
    assert not any("not_declared" in s.name for s in samples)
    subjects = {s.labels.get("subject") for s in samples if "subject" in s.labels}
    assert len(subjects) == MAX_HISTOGRAM_LABELS


def test_prometheus_names_are_what_the_exporter_writes() -> None:
    """The OpenTelemetry-to-Prometheus mapping METRIC_NAMES is computed with."""
    assert prometheus_name("ikefarm.esp.io", "By") == "ikefarm_esp_io_bytes"
    assert prometheus_name("process.uptime", "s") == "process_uptime_seconds"
    assert prometheus_name("ikefarm.esp.packets", "{packet}") == "ikefarm_esp_packets"
    assert prometheus_name("x.duration_seconds", "s") == "x_duration_seconds"


def test_without_a_snapshot_a_scrape_has_the_resource_only() -> None:
    export = MetricsExport("ike", "ike-0", "0", source=lambda: None)
    try:
        text = export.exposition()
    finally:
        export.close()
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names <= {"target_info"}


def test_a_scrape_observes_the_snapshot_of_that_scrape() -> None:
    """Asynchronous instruments: each collection reads the stats anew, nothing stale stays."""
    current = [stats({"a": 1}, {})]
    export = MetricsExport("ingress", "ingress-0", "0", source=lambda: current[0])
    try:
        first = export.exposition()
        current[0] = stats({"b": 5}, {})
        second = export.exposition()
    finally:
        export.close()
    assert 'event="a"' in first and 'event="b"' not in first
    assert 'event="b"' in second and 'event="a"' not in second
    assert 'service_name="ikefarm-ingress"' in second  # target_info: the resource


def samples_of(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    found: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "service"))
            found.setdefault(sample.name, {})[
                tuple(kv for kv in labels if kv[0] != "ikefarm_instance")
            ] = sample.value
    return found


def test_named_ike_metrics_come_from_the_engine_counters_and_state_counts() -> None:
    text = exposition(
        Stats(
            "ike",
            "ike-0",
            "0.1.0",
            1.0,
            0,
            0,
            {},
            {
                "engine": {
                    "exchange.responder.IKE_AUTH.AUTHENTICATION_FAILED": 2,
                    "exchange.initiator.INFORMATIONAL.timeout": 1,
                    "retransmits": 5,
                },
                "sa_states": {"ike": {"established": 3, "half-open": 1}, "child": {"installed": 4}},
            },
        )
    )
    samples = samples_of(text)
    exchanges = samples["ikefarm_ike_exchanges_total"]
    key = (("exchange", "IKE_AUTH"), ("result", "AUTHENTICATION_FAILED"), ("role", "responder"))
    assert exchanges[key] == 2
    assert len(exchanges) == 2
    # exchange counters are not repeated among the engine's other events
    assert set(samples["ikefarm_engine_events_total"]) == {(("event", "retransmits"),)}
    assert samples["ikefarm_ike_sas"][(("state", "established"),)] == 3
    assert samples["ikefarm_ike_child_sas"][(("state", "installed"),)] == 4


def test_named_ingress_kernel_and_flow_metrics() -> None:
    ingress = samples_of(
        exposition(
            Stats(
                "ingress",
                "i",
                "0",
                1.0,
                0,
                0,
                {},
                {"dos": {"cookie_mode": "threshold 10", "cookies_active": True}},
            )
        )
    )
    assert ingress["ikefarm_ike_cookies_required"][()] == 1
    assert ingress["ikefarm_ike_cookie_mode"][(("mode", "threshold 10"),)] == 1
    kernel = samples_of(
        exposition(
            Stats(
                "kernel",
                "k",
                "0",
                1.0,
                0,
                0,
                {
                    "esp.in.packets": 3,
                    "esp.in.bytes": 300,
                    "esp.out.packets": 2,
                    "esp.in.drop.replay": 1,
                    "esp.out.drop.no_sa": 4,
                    "esp.lifetime.in.soft": 1,
                },
                {"backend": "userspace"},
            )
        )
    )
    assert kernel["ikefarm_esp_packets_total"] == {
        (("network_io_direction", "receive"),): 3,
        (("network_io_direction", "transmit"),): 2,
    }
    assert kernel["ikefarm_esp_io_bytes_total"] == {(("network_io_direction", "receive"),): 300}
    assert kernel["ikefarm_esp_dropped_total"] == {
        (("network_io_direction", "receive"), ("reason", "replay")): 1,
        (("network_io_direction", "transmit"), ("reason", "no_sa")): 4,
    }
    flow = samples_of(
        exposition(
            Stats(
                "flow",
                "f",
                "0",
                1.0,
                0,
                0,
                {},
                {
                    "sessions": 7,
                    "max_sessions": 100,
                    "table.refused.table_full": 2,
                    "table.closed.aged": 1,
                },
            )
        )
    )
    assert flow["ikefarm_flow_sessions"][()] == 7
    assert flow["ikefarm_flow_sessions_limit"][()] == 100
    assert flow["ikefarm_flow_session_refusals_total"] == {(("reason", "table_full"),): 2}


@given(
    service=st.sampled_from(["ike", "ingress", "kernel", "flow", "keystore"]),
    counters=st.dictionaries(st.text(max_size=20), st.integers(0, 2**40)),
    gauges=st.dictionaries(
        st.sampled_from(["engine", "sa_states", "dos", "sessions", "max_sessions", "x"]),
        st.none()
        | st.integers()
        | st.text(max_size=5)
        | st.dictionaries(
            st.text(max_size=30), st.integers() | st.text(max_size=3) | st.booleans(), max_size=4
        ),
    ),
)
def test_named_metrics_never_fail_on_any_snapshot(service, counters, gauges) -> None:  # type: ignore[no-untyped-def]
    gauges.setdefault("sa_states", {"ike": 5, "child": {"installed": "x"}})
    text = exposition(Stats(service, "x-0", "0", 1.0, 0, 0, counters, gauges))
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert names <= METRIC_NAMES


def test_a_closed_export_records_nothing_more() -> None:
    from ikefarm.shared.observability.latency import BUS_REQUEST_DURATION, Latencies

    latencies = Latencies()
    export = MetricsExport("ike", "ike-0", "0", latencies, source=lambda: None)
    export.close()
    latencies.observe(BUS_REQUEST_DURATION, 0.1, "x")  # no meter: returns at once
    assert latencies.dropped == 0
