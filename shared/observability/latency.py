"""Latency histograms a service records: OpenTelemetry `Histogram` instruments.

`Runtime.latencies.observe(NAME, seconds, label)` records into the service's
meter once `[telemetry] metrics-listen` gave it one (`bind`,
shared/observability/metrics.py); without it an observation returns at once and
nothing of the OpenTelemetry SDK is imported. Observations are per bus request
and per handshake, never per datagram.
"""

from __future__ import annotations

from typing import Any

# the histograms services record (OpenTelemetry instrument names, unit "s"); the
# Prometheus exporter writes them ikefarm_bus_request_duration_seconds and
# ikefarm_ike_handshake_duration_seconds
BUS_REQUEST_DURATION = "ikefarm.bus.request.duration"  # attribute: the subject
IKE_HANDSHAKE_DURATION = "ikefarm.ike.handshake.duration"

# the attribute each histogram carries its label in ("": none)
HISTOGRAMS: dict[str, tuple[str, str]] = {
    BUS_REQUEST_DURATION: (
        "subject",
        "bus requests this process made (to the keystore, the kernel...), by subject",
    ),
    IKE_HANDSHAKE_DURATION: (
        "",
        "IKE SA establishment: first message of IKE_SA_INIT to the end of IKE_AUTH",
    ),
}

# upper bounds (s) of the latency buckets: bus round trips to slow handshakes
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MAX_HISTOGRAM_LABELS = 64  # distinct label values per histogram (subjects are a fixed set)


class Latencies:
    """The service's latency histograms. An observation costs one set lookup and the
    SDK's bucket search and locked add, whatever the number of SAs or requests."""

    def __init__(self) -> None:
        # name -> (instrument, label attribute, {label value seen: its point attributes})
        self._instruments: dict[str, tuple[Any, str, dict[str, dict[str, str]]]] = {}
        self._base: dict[str, str] = {}
        self.dropped = 0  # observations for a label past MAX_HISTOGRAM_LABELS

    def bind(self, meter: Any, attributes: dict[str, str]) -> None:
        """Record into `meter` from now on, every point with `attributes` (service, instance)."""
        self._base = dict(attributes)
        self._instruments = {
            name: (
                meter.create_histogram(name, unit="s", description=text),
                label,
                {},
            )
            for name, (label, text) in HISTOGRAMS.items()
        }

    def unbind(self) -> None:
        """Record nothing from now on (the meter is shut down)."""
        self._instruments = {}

    def observe(self, name: str, seconds: float, label: str = "") -> None:
        found = self._instruments.get(name)
        if found is None:
            return  # no meter (no metrics endpoint), or a name that is not declared
        instrument, key, seen = found
        attributes = self._base
        if key:
            attributes = seen.get(label)  # type: ignore[assignment]
            if attributes is None:
                if len(seen) >= MAX_HISTOGRAM_LABELS:
                    self.dropped += 1
                    return
                attributes = seen[label] = {**self._base, key: label}
        # a histogram takes no negative value; a clock step back counts as 0
        instrument.record(max(0.0, seconds), attributes)
