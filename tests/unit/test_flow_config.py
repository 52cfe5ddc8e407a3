"""`[flow]` as the session table reads it, and what config check refuses (docs/flow-sessions.md)."""

from __future__ import annotations

import pytest

from ikefarm.shared.config.loader import ConfigError, parse_config
from ikefarm.shared.flow.settings import Application, FlowSettings

EVERY_KNOB = """
[flow]
source = "dataplane"
max-sessions = 5000
[flow.session-timeouts]
tcp = 900
udp = 30
icmp = 10
other = 120
invalidated = 2
[flow.tcp-session]
tcp-initial-timeout = 4
time-wait-state = 12
rst-invalidate-session = true
fin-invalidate-session = true
no-syn-check = true
[flow.aging]
early-ageout = 7
high-watermark = 90
low-watermark = 70
[[flow.application]]
name = "mcast-feed"
protocol = "udp"
destination-port = 5000
inactivity-timeout = 500
policy = ["leaf-b"]
[[flow.application]]
name = "gre-any"
protocol = 47
inactivity-timeout = 90
"""


def test_every_knob_reaches_the_table_settings() -> None:
    settings = FlowSettings.from_config(parse_config(EVERY_KNOB).flow)
    assert settings == FlowSettings(
        max_sessions=5000,
        tcp=900,
        udp=30,
        icmp=10,
        other=120,
        invalidated=2,
        tcp_initial_timeout=4,
        time_wait_state=12,
        rst_invalidate_session=True,
        fin_invalidate_session=True,
        no_syn_check=True,
        early_ageout=7,
        high_watermark=90,
        low_watermark=70,
        applications=(
            Application("mcast-feed", 17, 5000, 500, frozenset({"leaf-b"})),
            Application("gre-any", 47, 0, 90),
        ),
    )
    assert FlowSettings.from_config(parse_config("").flow) == FlowSettings()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[flow.tcp-session]\ntcp-mss = 63\n", "flow.tcp-session.tcp-mss"),
        (
            '[flow]\nsource = "netlink"\n[flow.tcp-session]\ntcp-mss = 1360\n',
            'flow.tcp-session.tcp-mss: acts only with flow.source = "dataplane"',
        ),
        ("[flow.tcp-session]\nno-sequence-check = 1\n", "flow.tcp-session.no-sequence-check"),
        ("[flow.tcp-session]\ntcp-initial-timeout = 3\n", "tcp-initial-timeout"),
        ("[flow.aging]\nhigh-watermark = 50\nlow-watermark = 60\n", "low-watermark"),
        ('[[flow.application]]\nname = "x"\nprotocol = "udp"\n', "inactivity-timeout: is required"),
        (
            '[[flow.application]]\nname = "x"\nprotocol = "nope"\ninactivity-timeout = 9\n',
            "protocol",
        ),
        ('[flow]\nsource = "pcap"\n', "flow.source"),
    ],
)
def test_refused_at_config_check(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    assert expected in str(caught.value)


def test_the_tcp_checks_reach_the_settings() -> None:
    text = "[flow.tcp-session]\nno-sequence-check = true\ntcp-mss = 1360\n"
    settings = FlowSettings.from_config(parse_config(text).flow)
    assert settings.no_sequence_check is True
    assert settings.tcp_mss == 1360
    defaults = FlowSettings.from_config(parse_config("").flow)
    assert defaults.no_sequence_check is False
    assert defaults.tcp_mss is None
