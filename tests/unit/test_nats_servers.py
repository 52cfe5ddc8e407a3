"""Which NATS a farm talks to: `[nats] servers` (an external cluster) and `[nats] replicas`,
and the node configs `ikefarm config nats-node` writes (checked by nats-server itself)."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pytest

from ikefarm.shared.bus.auth import ensure_credentials
from ikefarm.shared.bus.cluster import node_config, write_node_config
from ikefarm.shared.bus.embedded import nats_server_binary
from ikefarm.shared.bus.servers import configured_nats_url, server_urls
from ikefarm.shared.cli.main import main
from ikefarm.shared.config.loader import ConfigError, parse_config


def test_servers_travel_as_one_comma_separated_url() -> None:
    config = parse_config(
        '[nats]\nservers = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]\nreplicas = 3\n'
    )
    url = configured_nats_url(config)
    assert url == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"
    assert server_urls(url) == ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222"]
    assert config.nats.replicas == 3
    assert configured_nats_url(parse_config('[nats]\nurl = "nats://h:1"\n')) == "nats://h:1"
    assert configured_nats_url(parse_config("")) == ""  # the embedded one
    assert server_urls(" nats://a:1 , ,nats://b:2") == ["nats://a:1", "nats://b:2"]


@pytest.mark.parametrize(
    ("text", "where", "why"),
    [
        ('url = "nats://a:1"\nservers = ["nats://b:1"]', "nats.servers", "not both"),
        ("replicas = 3", "nats.replicas", "embedded nats-server is one node"),
        ('servers = ["nats://a:1,nats://b:1"]', "nats.servers", "must match"),
        ('servers = ["nats://a:1"]\nreplicas = 6', "nats.replicas", "1-5"),
        ('servers = ["nats://a:1"]\nreplicas = 0', "nats.replicas", "1-5"),
    ],
)
def test_a_bus_config_that_cannot_work_is_refused(text: str, where: str, why: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config(f"[nats]\n{text}\n")
    message = str(refused.value)
    assert where in message and why in message, message


def test_replicas_with_an_external_nats_are_taken() -> None:
    assert parse_config('[nats]\nurl = "nats://a:1"\nreplicas = 3\n').nats.replicas == 3


def test_a_node_config_is_one_nats_server_takes(tmp_path: Path) -> None:
    users = ensure_credentials(tmp_path / "auth")
    routes = ["127.0.0.1:6222", "127.0.0.1:6223", "127.0.0.1:6224"]
    text = node_config(
        name="n0",
        listen="127.0.0.1:4222",
        cluster_listen=routes[0],
        routes=routes,
        store_dir=tmp_path / "store",
        credentials=users,
        monitor="127.0.0.1:8222",
    )
    path = write_node_config(tmp_path / "auth" / "nats-node-n0.conf", text)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds the passwords
    assert 'server_name: "n0"' in text and "nats-route://127.0.0.1:6223" in text
    assert users["ike"].password in text
    checked = subprocess.run(
        [nats_server_binary(), "-c", str(path), "-t"], capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout


def test_config_nats_node_writes_the_node_beside_the_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "auth"
    code = main(
        [
            "config", "nats-node", str(directory), "--name", "n1",
            "--listen", "127.0.0.1:4223", "--cluster-listen", "127.0.0.1:6223",
            "--route", "127.0.0.1:6222", "--route", "127.0.0.1:6224",
            "--store-dir", str(tmp_path / "store"),
        ]
    )  # fmt: skip
    assert code == 0
    written = directory / "nats-node-n1.conf"
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert (directory / "ike.json").exists()  # the credentials are made too
    out = capsys.readouterr().out
    assert str(written.resolve()) in out
    # the printed text says where the file is, never a password
    password = ensure_credentials(directory)["ike"].password
    assert password not in out
