"""`ikefarm up` keeps the master key to the keystore and its farm running (issue 16).

The master key reaches the keystore alone, down a pipe: no child's environment or
command line holds it, and a restarted keystore gets it again. A master key file
others can read is refused before anything starts. A broker that dies is brought
back with backoff, even when a restart fails, and `up.json` names the processes
running now.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ikefarm.services.keystore import store as keystore_store
from ikefarm.services.keystore.service import KeystoreService, KeystoreUnavailable, load_store
from ikefarm.shared.config.loader import load_config
from tests.service.test_up import SERVICES, alive, status, wait_for

KEY_VARIABLE = "IKEFARM_MASTER_KEY"


def the_test_key() -> str:
    """The fixed test master key tests/conftest.py puts in every test's environment."""
    return os.environ[KEY_VARIABLE]


def key_marks() -> tuple[bytes, ...]:
    key = the_test_key()
    return (key.encode(), key[2:].encode(), KEY_VARIABLE.encode())


class Farm:
    """A running `ikefarm up` and what it writes."""

    def __init__(self, process: subprocess.Popen[bytes], config: Path, log: IO[str]) -> None:
        self.process = process
        self.config = config
        self.log = log
        self.state_dir = Path(load_config(config).farm.state_dir)
        self.state_file = self.state_dir / "up.json"

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def log_lines(self) -> list[dict[str, Any]]:
        self.log.flush()
        lines = []
        for line in Path(self.log.name).read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
        return lines

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if line.get("event") == name]


def start_farm(argv: list[str], config: Path, tmp_path: Path, env: dict[str, str]) -> Farm:
    log = (tmp_path / "up.log").open("w+")
    process = subprocess.Popen([*argv, "up", "-c", str(config)], stdout=log, stderr=log, env=env)
    return Farm(process, config, log)


@pytest.fixture
def farm(ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path) -> Iterator[Farm]:
    # the key in up's environment, as ops/up and the README's examples give it
    running = start_farm(ikefarm_argv, loopback_config, tmp_path, dict(os.environ))
    try:
        yield running
    finally:
        if running.process.poll() is None:
            running.process.kill()
            running.process.wait()
        running.log.close()


def farm_up(argv: list[str], farm: Farm) -> dict[str, dict[str, Any]]:
    rows = wait_for(lambda: (r := status(argv, farm.config)) and set(r) == SERVICES and r, 30)
    assert rows and set(rows) == SERVICES, Path(farm.log.name).read_text()[-2000:]
    return dict(rows)


def proc_bytes(pid: int, what: str) -> bytes:
    return Path(f"/proc/{pid}/{what}").read_bytes()


def assert_no_master_key(pid: int) -> None:
    """Neither the environment this process was started with nor its command line holds
    the key or its variable."""
    for what in ("environ", "cmdline"):
        text = proc_bytes(pid, what)
        for mark in key_marks():
            found = mark in text  # not in the assertion: a failure must not print the key
            assert not found, f"{mark[:6]!r}... in /proc/{pid}/{what}"


def running_pids(farm: Farm) -> dict[str, int]:
    state = farm.state()
    pids = {"broker": state.get("broker_pid"), **state.get("children", {})}
    assert all(isinstance(pid, int) and alive(pid) for pid in pids.values()), pids
    return pids


def new_pid(farm: Farm, name: str, old: int) -> int | None:
    pid = running_pids_or_none(farm).get(name)
    return pid if pid is not None and pid != old and alive(pid) else None


def running_pids_or_none(farm: Farm) -> dict[str, int | None]:
    state = farm.state()
    return {"broker": state.get("broker_pid"), **state.get("children", {})}


def test_the_master_key_reaches_the_keystore_alone(farm: Farm, ikefarm_argv: list[str]) -> None:
    rows = farm_up(ikefarm_argv, farm)
    # the keystore opened the store with the key (it exits 1 otherwise) and imported the PSK
    assert rows["keystore"]["gauges"]["psk_entries"] == 1
    pids = running_pids(farm)
    assert len(pids) == 6
    for pid in pids.values():
        assert_no_master_key(pid)
    keystore_argv = proc_bytes(pids["keystore-0"], "cmdline").split(b"\0")
    assert b"--master-key-fd" in keystore_argv
    # read once and closed: no pipe is left open in the keystore
    fds = Path(f"/proc/{pids['keystore-0']}/fd")
    assert not [fd for fd in fds.iterdir() if os.readlink(fd).startswith("pipe:")]

    # a killed keystore is restarted and gets the key again through a fresh pipe
    os.kill(pids["keystore-0"], signal.SIGKILL)
    restarted = wait_for(lambda: new_pid(farm, "keystore-0", pids["keystore-0"]), 30)
    assert restarted, farm.state()
    rows = wait_for(lambda: (r := status(ikefarm_argv, farm.config)) and "keystore" in r and r, 30)
    assert rows and rows["keystore"]["gauges"]["psk_entries"] == 1
    assert_no_master_key(restarted)
    assert not [line for line in farm.log_lines() if "keystore locked" in json.dumps(line)]

    # up.json follows every restart: a killed worker's new pid replaces the dead one's
    os.kill(pids["ike-0"], signal.SIGKILL)
    assert wait_for(lambda: new_pid(farm, "ike-0", pids["ike-0"]), 30), farm.state()
    assert running_pids(farm)["keystore-0"] == restarted
    farm.process.send_signal(signal.SIGTERM)
    assert farm.process.wait(timeout=10) == 0


def test_up_takes_the_key_on_a_descriptor_and_no_environment_holds_it(
    ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path
) -> None:
    """`ops/up`'s way: `ikefarm up --master-key-fd 3 3<FILE` with no key in any environment,
    up's own included; the keystore still opens the store."""
    key_file = tmp_path / "master.key"
    key_file.write_text(the_test_key())
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "IKEFARM_MASTER_KEY"}
    log = (tmp_path / "up-fd.log").open("w+")
    env["KEY_FILE"] = str(key_file)
    argv = [*ikefarm_argv, "up", "-c", str(loopback_config), "--master-key-fd", "3"]
    # as ops/up runs it: the shell opens the file on descriptor 3 and execs `ikefarm up`
    process = subprocess.Popen(
        ["bash", "-c", 'exec "$@" 3<"$KEY_FILE"', "up", *argv], stdout=log, stderr=log, env=env
    )
    running = Farm(process, loopback_config, log)
    try:
        rows = farm_up(ikefarm_argv, running)
        assert rows["keystore"]["gauges"]["psk_entries"] == 1
        pids = running_pids(running)
        for pid in [process.pid, *pids.values()]:
            assert_no_master_key(pid)
        # up read the descriptor once and closed it
        assert not (Path(f"/proc/{process.pid}/fd") / "3").exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def key_file_config(config: Path, key_file: Path) -> Path:
    text = config.read_text() + f'\n[keystore]\nmaster-key-file = "{key_file}"\n'
    config.write_text(text)
    return config


def test_a_master_key_file_others_can_read_is_refused(
    ikefarm_argv: list[str], loopback_config: Path, tmp_path: Path
) -> None:
    key_file = tmp_path / "master.key"
    key_file.write_text("0x" + "4b" * 32 + "\n")
    key_file.chmod(0o644)
    config = key_file_config(loopback_config, key_file)
    state_dir = Path(load_config(config).farm.state_dir)
    result = subprocess.run(
        [*ikefarm_argv, "up", "-c", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert (
        f"ikefarm up: keystore: keystore locked: permissions 0644 for {key_file} are too open; "
        "it must be readable by its owner only (chmod 600)"
    ) in result.stderr
    # refused before anything started: no broker store, no up.json
    assert not (state_dir / "nats").exists() and not (state_dir / "up.json").exists()

    key_file.chmod(0o600)
    # the environment's key (the tests' own) is stripped from every child too
    farm = start_farm(ikefarm_argv, config, tmp_path, dict(os.environ))
    try:
        rows = farm_up(ikefarm_argv, farm)
        assert rows["keystore"]["gauges"]["psk_entries"] == 1
        pids = running_pids(farm)
        for pid in pids.values():
            assert_no_master_key(pid)
        # the keystore reads the file itself: no pipe from up
        assert b"--master-key-fd" not in proc_bytes(pids["keystore-0"], "cmdline")
        farm.process.send_signal(signal.SIGTERM)
        assert farm.process.wait(timeout=10) == 0
    finally:
        if farm.process.poll() is None:
            farm.process.kill()
            farm.process.wait()
        farm.log.close()


def test_a_broker_restart_that_fails_is_retried(farm: Farm, ikefarm_argv: list[str]) -> None:
    farm_up(ikefarm_argv, farm)
    pids = running_pids(farm)
    # the broker's store directory made unusable (a file where the directory was): the
    # restart fails for real until it is put back
    store = farm.state_dir / "nats"
    aside = farm.state_dir / "nats.aside"
    store.rename(aside)
    store.write_text("not a directory\n")
    os.kill(pids["broker"], signal.SIGKILL)

    exited = wait_for(lambda: farm.events("embedded_nats_exited"), 15)
    assert exited and exited[0]["level"] == 0
    failed = wait_for(lambda: farm.events("embedded_nats_restart_failed"), 15)
    assert failed and failed[0]["level"] == 0, farm.log_lines()[-5:]
    assert "File exists" in failed[0]["error"]
    # while no broker runs, up.json says so
    assert wait_for(lambda: farm.state().get("broker_pid", 0) is None, 5)
    store.unlink()
    aside.rename(store)

    restarted = wait_for(lambda: farm.events("embedded_nats_restarted"), 30)
    assert restarted and restarted[0]["level"] == 0
    broker = wait_for(lambda: new_pid(farm, "broker", pids["broker"]), 10)
    assert broker == restarted[0]["pid"]
    # the services reconnect to the broker on its old port
    rows = wait_for(
        lambda: (
            (r := status(ikefarm_argv, farm.config))
            and set(r) == SERVICES
            and all(row["counters"].get("nats_reconnects", 0) >= 1 for row in r.values())
            and r
        ),
        30,
    )
    assert rows, farm.log_lines()[-5:]
    assert farm.state()["nats_url"] == restarted[0]["url"]

    # and a broker killed again comes back too (backoff never stops the checking)
    os.kill(broker, signal.SIGKILL)
    assert wait_for(lambda: new_pid(farm, "broker", broker), 30), farm.state()
    assert len(farm.events("embedded_nats_restarted")) == 2
    farm.process.send_signal(signal.SIGTERM)
    assert farm.process.wait(timeout=10) == 0


@pytest.fixture
def fresh_keystore_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """receive_master_key keeps what it took for the process's life; a test starts afresh."""
    monkeypatch.setattr(keystore_store, "_received", None)
    monkeypatch.setattr(keystore_store, "_received_from", "")


def test_the_keystore_takes_the_key_from_a_pipe_once(
    fresh_keystore_process: None, loopback_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_config(loopback_config)
    load_store(config)  # made with the tests' key from the environment
    key = the_test_key()
    monkeypatch.delenv(KEY_VARIABLE)

    def send(text: str) -> int:
        read_end, write_end = os.pipe()
        os.write(write_end, text.encode() + b"\n")
        os.close(write_end)
        KeystoreService.receive_master_key(config, read_end)
        return read_end

    send("0x" + "ab" * 32)
    with pytest.raises(KeystoreUnavailable, match="wrong master key") as wrong:
        KeystoreService.preflight(config)
    assert "abab" not in str(wrong.value)
    read_end = send(key)
    with pytest.raises(OSError):
        os.fstat(read_end)  # closed once read
    KeystoreService.preflight(config)
    KeystoreService.preflight(config)  # the key stays in the process, not in the pipe


@pytest.mark.parametrize(
    ("sent", "refusal"),
    [
        (b"", "no master key: nothing came through the pipe from ikefarm up"),
        (b"x" * 5000, "longer than 4096 characters"),
        (b"\xff" * 32, "is not UTF-8 text"),
        (b"short", "5 octets; at least 16 are needed"),
    ],
)
def test_a_bad_pipe_is_refused_without_the_key(
    fresh_keystore_process: None, loopback_config: Path, sent: bytes, refusal: str
) -> None:
    config = load_config(loopback_config)
    read_end, write_end = os.pipe()
    os.write(write_end, sent)
    os.close(write_end)
    KeystoreService.receive_master_key(config, read_end)
    with pytest.raises(KeystoreUnavailable, match=refusal) as refused:
        KeystoreService.preflight(config)
    if sent:
        assert sent[:5].decode(errors="replace") not in str(refused.value)


def test_the_keystore_alone_deletes_the_variable_it_read(
    fresh_keystore_process: None, loopback_config: Path
) -> None:
    config = load_config(loopback_config)
    load_store(config)
    assert os.environ.get(KEY_VARIABLE)
    KeystoreService.receive_master_key(config, None)
    assert KEY_VARIABLE not in os.environ
    KeystoreService.preflight(config)  # opened with the key it took


@pytest.fixture
def key_text() -> str:
    """The tests' key, read before any example takes it out of the environment."""
    return the_test_key()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(sent=st.binary(max_size=5000) | st.text(max_size=200).map(str.encode))
def test_anything_down_the_pipe_opens_or_is_refused(
    fresh_keystore_process: None, loopback_config: Path, key_text: str, sent: bytes
) -> None:
    """Whatever comes through the pipe: the store made with the tests' key opens only with
    that key, anything else is a KeystoreUnavailable sentence, never a crash."""
    config = load_config(loopback_config)
    if not keystore_store.store_path(config).exists():
        load_store(config)
    read_end, write_end = os.pipe()
    os.write(write_end, sent)
    os.close(write_end)
    KeystoreService.receive_master_key(config, read_end)
    try:
        KeystoreService.preflight(config)
    except KeystoreUnavailable as exc:
        assert str(exc).startswith("keystore locked: ")
    else:
        assert sent.strip() == key_text.encode()
