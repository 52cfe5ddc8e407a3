"""Which NATS servers a farm's processes connect to: one URL, or one cluster's nodes.

`[nats] servers` (an external cluster) travels as one string with the URLs separated by
commas, as `--nats` takes it on every command line; nats-py connects to one of them and
fails over to the others (and to the nodes the cluster announces). Kept free of the bus
client so the CLI imports it cheaply.
"""

from __future__ import annotations

from ikefarm.shared.config.loader import Config


def configured_nats_url(config: Config) -> str:
    """The bus the config names: `[nats] servers` joined with commas (one cluster's nodes,
    as `--nats` takes them), else `[nats] url`; "" for the embedded nats-server."""
    if config.nats.servers:
        return ",".join(config.nats.servers)
    return str(config.nats.url or "")


def server_urls(url: str) -> list[str]:
    """The servers of a bus URL: one, or several of one cluster separated by commas (nats-py
    connects to one of them and fails over to the others, and to what the cluster
    announces)."""
    return [part.strip() for part in url.split(",") if part.strip()]
