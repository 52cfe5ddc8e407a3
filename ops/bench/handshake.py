"""Benchmark: IKE handshakes and their CPU cost, ikefarm beside strongSwan, in one run.

    gen ns (load generators, ops/bench/loadgen.py) --192.0.2.0/24---- ikf ns: `ikefarm up`
                                                   --198.51.100.0/24-- ss ns: strongSwan charon

Both responders are up for the whole run, configured alike: PSK, x25519,
AES-GCM, cookies and per-peer limits off, half-open SAs kept 180 s, ikefarm with
`[ike.session.half-open] max-count = 10000` and strongSwan with
`ikesa_table_size = 4096`. Each measurement runs against one responder while the
other is idle, then the same against the other (the order alternates by
repetition), and each starts from a freshly started responder unless it measures
a full table. The generators run in several processes, each on its own address,
so neither their CPU nor one socket is the bottleneck; their own CPU is reported.

Measurements (per responder, then ikefarm / strongSwan):

- ``init``: IKE_SA_INIT probes at `--rate` for `--duration` s from an empty table:
  answered %, median/p99 latency, responder CPU per answered IKE_SA_INIT (utime +
  stime of every process in the responder's namespace, nats-server included).
- ``flat``: IKE_SA_INIT answered per second at `--saturate` offered, from an empty
  table and again with `--half-open` half-open SAs (filled at `--rate` first).
- ``table``: the saturated probe from an empty table, and again with
  `--table-established` SAs established (one CHILD_SA each, kept up by the
  generators) and `--table-half-open` half-open SAs: answered rate and CPU per
  answer, full table / empty table (issue 9: flat within 10%).
- ``full``: complete handshakes (IKE_SA_INIT + IKE_AUTH + one CHILD_SA) at
  `--full-rate` until `--established` SAs are up: latency, CPU per handshake, and
  the responders' RSS growth per established SA; then the `flat` probe again
  with those SAs established.

`--workers 1 2` runs one farm per worker count (each in its namespace, the same
generators), so one run compares them with each other and with strongSwan.

Run as root from the repository root: ops/bench/handshake [options]. Prints one
JSON object; with --results FILE it appends a Markdown section there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from ops.bench.cookie_flood import responder_connection  # noqa: E402
from ops.bench.loadgen import Stats  # noqa: E402
from tests.harness.gateway import Gateway, farm_config, vpn_config  # noqa: E402
from tests.harness.netns import Namespace, link, namespace_pids, wait_for  # noqa: E402
from tests.harness.strongswan import Psk, StrongSwan  # noqa: E402

PSK = "bench-psk-6d1f0a93c2b7e845"
IKEFARM, STRONGSWAN = "192.0.2.1", "198.51.100.1"
CLOCK_TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def farm_toml(workdir: Path, *, address: str = IKEFARM, workers: int = 1, psk: str = PSK) -> str:
    """`ikefarm up` as a bare responder: cookies, per-peer limits and DPD off; a fresh
    master key for its keystore in `workdir`."""
    key_file = workdir / "master.key"
    if not key_file.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        key_file.touch(mode=0o600)
        key_file.write_text("0x" + os.urandom(32).hex())
    limits = (
        f'[keystore]\nmaster-key-file = "{key_file}"\n\n'
        "[ike.global-options.dos-protection]\ncookie-threshold = 0\nblock-threshold = 0\n\n"
        "[ike.session.half-open]\nmax-count = 10000\ntimeout = 180\n"
    )
    vpn = vpn_config(
        "rw",
        local_id="gw.example",
        remote_id="*.peer.example",
        policies=[("net", "10.100.0.0/24", "10.200.0.0/16")],
        local_address=address,
        remote_address="any",
    )
    return farm_config(
        workdir,
        psks=[("gw.example", "%any", psk)],
        vpns=[vpn, limits],
        workers=workers,
        log_level=0,
    )


# -- the responders' processes, read from /proc ---------------------------------------------


def proc_cpu(pid: int) -> float:
    """utime + stime of one process (all its threads), in seconds; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def proc_rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def udp_drops(ns: Namespace) -> int:
    """Datagrams the namespace's UDP sockets dropped for a full receive buffer (RcvbufErrors)."""
    text = ns.run(["cat", "/proc/net/snmp"]).stdout
    rows = [line.split()[1:] for line in text.splitlines() if line.startswith("Udp:")]
    return int(dict(zip(rows[0], rows[1], strict=True))["RcvbufErrors"]) if len(rows) >= 2 else 0


def proc_label(pid: int, names: dict[int, str]) -> str:
    if pid in names:
        return names[pid]
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "gone"
    text = b" ".join(argv).decode(errors="replace")
    if "nats-server" in text:
        return "nats-server"
    if "charon" in text:
        return "charon"
    if " up " in f"{text} ":
        return "supervisor"
    return Path(argv[0].decode(errors="replace")).name or "?"


@dataclass
class Responder:
    """One responder under test: started fresh on demand; its processes are its namespace's."""

    name: str
    address: str
    ns: Namespace
    start_fn: Callable[[], None]
    stop_fn: Callable[[], None]
    names_fn: Callable[[], dict[int, str]]
    holder: dict[str, Any]  # the running Gateway ("gw") or StrongSwan ("charon")

    def gateway(self) -> Gateway:
        return self.holder["gw"]

    def restart(self) -> None:
        self.stop_fn()
        self.start_fn()

    def pids(self) -> list[int]:
        return namespace_pids(self.ns.name)

    def by_process(self, read: Callable[[int], float]) -> dict[str, float]:
        """`read(pid)` summed by process label (several processes may share a label)."""
        names = self.names_fn()
        out: dict[str, float] = {}
        for pid in self.pids():
            label = proc_label(pid, names)
            out[label] = out.get(label, 0) + read(pid)
        return out

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far by process label."""
        return self.by_process(proc_cpu)

    def rss(self) -> dict[str, float]:
        """Resident bytes by process label."""
        return self.by_process(proc_rss)

    def half_open(self) -> int | None:
        """Half-open SAs the responder holds, where it says (ikefarm's `status`)."""
        gateway = self.holder.get("gw")
        if gateway is None:
            return None
        rows = gateway.status().get("ike", [])
        return sum(int(row.get("gauges", {}).get("half_open", 0)) for row in rows)

    def settle(self, timeout: float = 30.0, idle: float = 0.05) -> float:
        """Wait until the responder is done with what it was sent (it may still be working
        through a backlog when the generators stop): less than `idle` of a CPU over half a
        second. Returns the seconds waited."""
        started = time.monotonic()
        before = sum(self.cpu().values())
        while time.monotonic() - started < timeout:
            time.sleep(0.5)
            now = sum(self.cpu().values())
            if now - before < idle * 0.5:
                break
            before = now
        return round(time.monotonic() - started, 1)


def ikefarm_responder(
    ns: Namespace, workdir: Path, workers: int, name: str = "ikefarm", address: str = IKEFARM
) -> Responder:
    holder: dict[str, Any] = {}

    def start() -> None:
        gateway = Gateway(ns, workdir, farm_toml(workdir, address=address, workers=workers))
        holder["gw"] = gateway
        try:
            gateway.start(timeout=60)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n--- ikefarm log ---\n{gateway.log_tail()}") from exc

    def stop() -> None:
        if "gw" in holder:
            holder.pop("gw").stop()
            wait_for(lambda: not namespace_pids(ns.name), timeout=15, what="ikefarm gone")

    def names() -> dict[int, str]:
        gateway = holder.get("gw")
        pids = gateway.service_pids() if gateway else {}
        return {pid: name.rstrip("0123456789-") or name for name, pid in pids.items()}

    return Responder(name, address, ns, start, stop, names, holder)


def strongswan_responder(ns: Namespace, workdir: Path) -> Responder:
    holder: dict[str, Any] = {}
    connection = responder_connection()  # the cookie-flood bench's responder
    runs = iter(range(1_000_000))

    def start() -> None:
        charon = StrongSwan(
            ns,
            workdir / f"run{next(runs)}",
            name="ss-responder",
            log_levels={"default": 0, "ike": 0, "cfg": 0, "chd": 0, "net": 0, "enc": 0, "knl": 0},
            charon_options={
                "dos_protection": False,  # no cookies, no block_threshold
                "ikesa_table_size": 4096,
                "half_open_timeout": 180,
                "init_limit_half_open": 0,
            },
        )
        charon.start(timeout=30)
        charon.load([connection], psks=[Psk(PSK, ["gw.example", "%any"])])
        holder["charon"] = charon

    def stop() -> None:
        if "charon" in holder:
            holder.pop("charon").stop()
            wait_for(lambda: not namespace_pids(ns.name), timeout=15, what="charon gone")

    return Responder("strongSwan", STRONGSWAN, ns, start, stop, dict, holder)


# -- generators -----------------------------------------------------------------------------


@dataclass
class Generators:
    """Load generator processes in the generator namespace, one per local address."""

    ns: Namespace
    addresses: list[str]
    mode: str
    remote: str
    procs: list[subprocess.Popen[str]]

    @classmethod
    def start(
        cls,
        ns: Namespace,
        addresses: list[str],
        remote: str,
        mode: str,
        rate: float,
        duration: float,
        *,
        answers: int | None = None,
        hold: float = 0.0,
    ) -> Generators:
        share = rate / len(addresses)
        procs = []
        env = {**os.environ, "PYTHONPATH": str(REPO), "LOADGEN_PSK": PSK}
        for i, address in enumerate(addresses):
            argv = [sys.executable, "-m", "ops.bench.loadgen", "--mode", mode]
            argv += ["--local", address, "--remote", remote, "--local-id", f"load{i}.peer.example"]
            argv += ["--rate", str(share), "--duration", str(duration), "--wait-go"]
            if answers is not None:
                argv += ["--answers", str(max(1, answers // len(addresses)))]
            if hold:
                argv += ["--hold", str(hold)]
            procs.append(
                ns.popen(
                    argv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    stdin=subprocess.PIPE,
                    env=env,
                    text=True,
                )
            )
        generators = cls(ns, addresses, mode, remote, procs)
        for proc in procs:  # each prints "ready" after its warm-up
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if "ready" not in line:
                generators.stop()
                raise RuntimeError(f"generator failed: {line} {proc.stderr.read()}")  # type: ignore[union-attr]
        return generators

    def go(self) -> None:
        for proc in self.procs:
            proc.stdin.write("go\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]

    def results(self, timeout: float) -> Stats:
        shares = []
        for proc in self.procs:
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if not line.startswith("{"):
                raise RuntimeError(f"generator failed: {line} {proc.stderr.read()}")  # type: ignore[union-attr]
            shares.append(json.loads(line))
        return Stats.merge(shares)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- one measurement ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def phase(
    gen_ns: Namespace,
    addresses: list[str],
    responder: Responder,
    mode: str,
    rate: float,
    duration: float,
    *,
    answers: int | None = None,
    keep: bool = False,
) -> tuple[dict[str, Any], Generators | None]:
    """One load against one responder: the generators' stats and the responder's CPU/RSS."""
    profilers = start_profilers(responder, f"{mode}-{int(rate)}", duration)
    generators = Generators.start(
        gen_ns,
        addresses,
        responder.address,
        mode,
        rate,
        duration,
        answers=answers,
        hold=600.0 if keep else 0.0,
    )
    try:
        rss0 = responder.rss()
        drops0 = udp_drops(responder.ns)
        cpu0 = responder.cpu()
        wall0 = time.monotonic()
        generators.go()
        stats = generators.results(timeout=duration + 120)
        wall = time.monotonic() - wall0
        cpu1 = responder.cpu()
        rss1 = responder.rss()
        drops = udp_drops(responder.ns) - drops0
    except BaseException:
        generators.stop()
        raise
    if not keep:
        generators.stop()
    for profiler in profilers:
        profiler.wait(timeout=60)
    by_process = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 3) for k in cpu1}
    cpu = sum(by_process.values())
    answered = stats.answered
    window = max(1, int(duration))
    in_window = sum(stats.per_second[:window])
    result = {
        "mode": mode,
        "offered_rate": rate,
        "sent": stats.sent,
        "answered": answered,
        "answered_pct": round(100.0 * answered / max(1, stats.sent), 2),
        "refused": stats.refused,
        "unanswered": stats.unanswered,
        "established": stats.established,
        "with_child": stats.with_child,
        "answered_per_s": round(in_window / min(window, max(stats.elapsed, 1e-3)), 1),
        "per_second": stats.per_second,
        "median_ms": _ms(percentile(stats.latencies, 0.5)),
        "p99_ms": _ms(percentile(stats.latencies, 0.99)),
        "responder_cpu_s": round(cpu, 3),
        "responder_cpu_by_process": by_process,
        "cpu_us_per_answer": round(1e6 * cpu / answered, 1) if answered else None,
        "responder_udp_rcvbuf_drops": drops,
        "rss_growth_bytes": sum(rss1.values()) - sum(rss0.values()),
        "rss_growth_by_process": {k: v - rss0.get(k, 0) for k, v in rss1.items()},
        "rss_bytes": sum(rss1.values()),
        "generator_cpu_s": round(stats.cpu, 3),
        "generator_busy": round(stats.cpu / max(1e-9, wall * len(addresses)), 3),
        "wall_s": round(wall, 2),
        "errors": stats.errors,
    }
    return result, generators if keep else None


PROFILE: dict[str, Any] = {"dir": None}  # --profile: where py-spy writes, if anywhere


def start_profilers(
    responder: Responder, tag: str, seconds: float
) -> list[subprocess.Popen[bytes]]:
    """py-spy on ikefarm's ike worker(s), ingress, keystore and kernel for the phase."""
    folder = PROFILE["dir"]
    if folder is None or "gw" not in responder.holder:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    spy = str(Path(sys.executable).parent / "py-spy")
    procs = []
    for pid, label in responder.names_fn().items():
        if label not in ("ike", "ingress", "keystore", "kernel"):
            continue
        out = folder / f"{label}-{pid}-{tag}.txt"
        argv = [spy, "record", "-p", str(pid), "-o", str(out), "--format", "raw"]
        argv += ["-d", str(int(seconds) + 2), "-r", "250", "--nonblocking"]
        procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return procs


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(1000 * seconds, 2)


def measure(
    responder: Responder,
    gen_ns: Namespace,
    probes: list[str],
    fulls: list[str],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    phases = set(args.phases)
    if "init" in phases:
        responder.restart()
        log(f"{responder.name}: init {args.rate}/s for {args.duration}s")
        out["init"], _ = phase(gen_ns, probes, responder, "init", args.rate, args.duration)
    if "flat" in phases:
        responder.restart()
        log(f"{responder.name}: saturated probe, empty table")
        empty, _ = phase(gen_ns, probes, responder, "init", args.saturate, args.probe_seconds)
        responder.restart()
        log(f"{responder.name}: fill {args.half_open} half-open at {args.rate}/s")
        fill, _ = phase(
            gen_ns,
            probes,
            responder,
            "init",
            args.rate,
            args.half_open / args.rate * 6,
            answers=args.half_open,
        )
        fill["settle_s"] = responder.settle()
        held = responder.half_open()
        half_open = fill["answered"] if held is None else held
        log(f"{responder.name}: saturated probe, {half_open} half-open")
        full, _ = phase(gen_ns, probes, responder, "init", args.saturate, args.probe_seconds)
        out["flat"] = {
            "empty": empty,
            "fill": fill,
            "half_open": half_open,
            "full": full,
            "ratio": _ratio(full["answered_per_s"], empty["answered_per_s"]),
            # robust on a shared machine: CPU per answer does not depend on the CPU we get
            "cpu_ratio": _ratio(full["cpu_us_per_answer"], empty["cpu_us_per_answer"]),
        }
    if "table" in phases:
        out["table"] = table_phase(responder, gen_ns, probes, fulls, args, log)
    if "full" in phases:
        responder.restart()
        log(f"{responder.name}: {args.established} full handshakes at {args.full_rate}/s")
        result, held = phase(
            gen_ns,
            fulls,
            responder,
            "full",
            args.full_rate,
            args.established / args.full_rate,
            keep=True,
        )
        try:
            done = result["answered"]
            result["bytes_per_sa"] = round(result["rss_growth_bytes"] / done) if done else None
            log(f"{responder.name}: saturated probe with {result['answered']} established")
            probe, _ = phase(gen_ns, probes, responder, "init", args.saturate, args.probe_seconds)
            result["probe_with_established"] = probe
        finally:
            if held is not None:
                held.stop()
        out["full"] = result
    return out


def table_phase(
    responder: Responder,
    gen_ns: Namespace,
    probes: list[str],
    fulls: list[str],
    args: argparse.Namespace,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The saturated probe on an empty table, then on a table holding `--table-established`
    established SAs (one CHILD_SA each, kept up) and `--table-half-open` half-open SAs:
    answered rate and CPU per answer, each against the empty table's."""
    responder.restart()
    # a farm just started answers its first second in fits (each process's first
    # handshake, its first snapshot); the table's probe comes after 10,000 handshakes
    log(f"{responder.name}: table: warm-up, 100 IKE_SA_INIT")
    phase(gen_ns, probes, responder, "init", 100.0, 1.0)
    responder.settle()
    log(f"{responder.name}: table: saturated probe, empty table")
    empty, _ = phase(gen_ns, probes, responder, "init", args.saturate, args.probe_seconds)
    responder.restart()
    count = args.table_established
    log(f"{responder.name}: table: {count} full handshakes at {args.full_rate}/s")
    made, held = phase(
        gen_ns, fulls, responder, "full", args.full_rate, count / args.full_rate, keep=True
    )
    try:
        wanted = args.table_half_open
        log(f"{responder.name}: table: fill {wanted} half-open at {args.rate}/s")
        fill, _ = phase(
            gen_ns, probes, responder, "init", args.rate, wanted / args.rate * 6, answers=wanted
        )
        fill["settle_s"] = responder.settle()
        reported = responder.half_open()
        half_open = fill["answered"] if reported is None else reported
        log(
            f"{responder.name}: table: saturated probe, {made['established']} established, "
            f"{half_open} half-open"
        )
        full, _ = phase(gen_ns, probes, responder, "init", args.saturate, args.probe_seconds)
    finally:
        if held is not None:
            held.stop()
    return {
        "empty": empty,
        "established": made["established"],
        "establish": {k: v for k, v in made.items() if k != "per_second"},
        "fill": fill,
        "half_open": half_open,
        "full": full,
        "ratio": _ratio(full["answered_per_s"], empty["answered_per_s"]),
        "cpu_ratio": _ratio(full["cpu_us_per_answer"], empty["cpu_us_per_answer"]),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def farm_name(workers: list[int], index: int) -> str:
    """ "ikefarm" for the first farm of the run; the others named by their worker count."""
    return "ikefarm" if index == 0 else f"ikefarm, {workers[index]} workers"


def machine_facts() -> dict[str, Any]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    charon = subprocess.run(
        ["/usr/lib/ipsec/charon", "--version"], capture_output=True, text=True, check=False
    )
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "strongswan": (charon.stdout or charon.stderr).strip().splitlines()[-1:] or ["?"],
        "ikefarm_commit": commit.stdout.strip(),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    facts = machine_facts()
    gen_ns = Namespace("gen")
    ss_ns = Namespace("ss")
    namespaces = [gen_ns, ss_ns]
    count = args.procs
    to_ss = [f"198.51.100.{10 + i}" for i in range(2 * count)]
    responders: list[Responder] = []
    runs: list[dict[str, Any]] = []
    try:
        addresses: dict[str, tuple[list[str], list[str]]] = {}
        for index, workers in enumerate(args.workers):
            # the first farm on 192.0.2.0/24, any other on a /24 of 10.99.0.0/16
            net = "192.0.2" if index == 0 else f"10.99.{index}"
            ikf_ns = Namespace("ikf")
            namespaces.append(ikf_ns)
            to_ikf = [f"{net}.{10 + i}" for i in range(2 * count)]
            link(ikf_ns, gen_ns, f"{net}.1/24", [f"{a}/24" for a in to_ikf])
            name = farm_name(args.workers, index)
            responders.append(
                ikefarm_responder(ikf_ns, workdir / f"ikefarm{index}", workers, name, f"{net}.1")
            )
            addresses[name] = (to_ikf[:count], to_ikf[count:])
        link(ss_ns, gen_ns, f"{STRONGSWAN}/24", [f"{a}/24" for a in to_ss])
        ss_ns.add_address("lo", "10.100.0.1/32")  # kernel-libipsec routes need a local TS address
        responders.append(strongswan_responder(ss_ns, workdir / "strongswan"))
        addresses["strongSwan"] = (to_ss[:count], to_ss[count:])
        for repetition in range(args.repeat):
            order = responders if repetition % 2 == 0 else responders[::-1]
            results: dict[str, Any] = {}
            for responder in order:
                probes, fulls = addresses[responder.name]
                results[responder.name] = measure(responder, gen_ns, probes, fulls, args, log)
            runs.append(results)
    finally:
        for responder in responders:
            try:
                responder.stop_fn()
            except Exception as exc:  # cleanup goes on
                log(f"stopping {responder.name}: {exc}")
        for ns in namespaces:
            ns.close()
    facts["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    return {"machine": facts, "runs": runs, "summary": summary(runs)}


# -- what the runs say ----------------------------------------------------------------------

METRICS: list[tuple[str, str, Callable[[dict[str, Any]], Any]]] = [
    ("init", "IKE_SA_INIT answered %", lambda r: r["init"]["answered_pct"]),
    ("init", "IKE_SA_INIT answered/s", lambda r: r["init"]["answered_per_s"]),
    ("init", "median latency, ms", lambda r: r["init"]["median_ms"]),
    ("init", "p99 latency, ms", lambda r: r["init"]["p99_ms"]),
    ("init", "CPU per answered IKE_SA_INIT, us", lambda r: r["init"]["cpu_us_per_answer"]),
    (
        "init",
        "datagrams lost in the responder's UDP receive buffers",
        lambda r: r["init"]["responder_udp_rcvbuf_drops"],
    ),
    ("flat", "saturated answers/s, empty table", lambda r: r["flat"]["empty"]["answered_per_s"]),
    ("flat", "saturated answers/s, with half-open", lambda r: r["flat"]["full"]["answered_per_s"]),
    ("flat", "half-open SAs for that", lambda r: r["flat"]["half_open"]),
    ("flat", "flatness (with half-open / empty)", lambda r: r["flat"]["ratio"]),
    (
        "flat",
        "CPU per answer, with half-open / empty",
        lambda r: r["flat"]["cpu_ratio"],
    ),
    (
        "table",
        "table: saturated answers/s, empty table",
        lambda r: r["table"]["empty"]["answered_per_s"],
    ),
    (
        "table",
        "table: CPU per answer, empty table, us",
        lambda r: r["table"]["empty"]["cpu_us_per_answer"],
    ),
    ("table", "table: established SAs", lambda r: r["table"]["established"]),
    ("table", "table: half-open SAs", lambda r: r["table"]["half_open"]),
    (
        "table",
        "table: saturated answers/s, full table",
        lambda r: r["table"]["full"]["answered_per_s"],
    ),
    (
        "table",
        "table: CPU per answer, full table, us",
        lambda r: r["table"]["full"]["cpu_us_per_answer"],
    ),
    ("table", "table: answered rate, full / empty", lambda r: r["table"]["ratio"]),
    ("table", "table: CPU per answer, full / empty", lambda r: r["table"]["cpu_ratio"]),
    ("full", "handshakes complete %", lambda r: r["full"]["answered_pct"]),
    ("full", "handshake median latency, ms", lambda r: r["full"]["median_ms"]),
    ("full", "CPU per full handshake, us", lambda r: r["full"]["cpu_us_per_answer"]),
    ("full", "memory per established SA, bytes", lambda r: r["full"]["bytes_per_sa"]),
    (
        "full",
        "saturated answers/s with those SAs established",
        lambda r: r["full"]["probe_with_established"]["answered_per_s"],
    ),
]


def summary(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each metric: the median over repetitions per responder, and ikefarm / strongSwan
    (each further farm of the run too: `ratios`)."""
    names = list(dict.fromkeys(name for run_ in runs for name in run_))
    farms = [name for name in names if name != "strongSwan"]
    rows = []
    for phase_name, label, get in METRICS:
        values: dict[str, list[float]] = {name: [] for name in ["ikefarm", "strongSwan", *names]}
        for run_ in runs:
            for name, found in values.items():
                if phase_name in run_.get(name, {}):
                    value = get(run_[name])
                    if value is not None:
                        found.append(value)
        if not any(values.values()):
            continue
        med = {k: round(statistics.median(v), 3) if v else None for k, v in values.items()}
        rows.append(
            {
                "metric": label,
                "ikefarm": med["ikefarm"],
                "strongSwan": med["strongSwan"],
                "ratio": _ratio(med["ikefarm"], med["strongSwan"]),
                "n": len(values["ikefarm"]),
                "values": {name: med[name] for name in names},
                "ratios": {name: _ratio(med[name], med["strongSwan"]) for name in farms},
            }
        )
    return rows


def markdown(result: dict[str, Any], command: str, note: str) -> str:
    facts = result["machine"]
    lines = [
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: handshakes\n",
        f"Command: `{command}`\n",
        f"Machine: {facts['cpus']} CPUs ({facts['cpu_model']}), Linux {facts['kernel']}, "
        f"Python {facts['python']}, {' '.join(facts['strongswan'])}, ikefarm "
        f"{facts['ikefarm_commit']}; load average {' '.join(facts['loadavg_start'])} at the "
        f"start, {' '.join(facts['loadavg_end'])} at the end.\n",
    ]
    if note:
        lines.append(note + "\n")
    names = list(result["summary"][0]["values"]) if result["summary"] else []
    farms = [name for name in names if name != "strongSwan"]
    head = ["", *names, *(f"{name} / strongSwan" for name in farms)]
    lines.append("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for row in result["summary"]:
        cells = [row["metric"], *(row["values"][n] for n in names)]
        cells += [row["ratios"][n] for n in farms]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    busy = [
        (name, phase_name, run_[name][phase_name].get("generator_busy"))
        for run_ in result["runs"]
        for name in run_
        for phase_name in ("init", "full")
        if phase_name in run_[name]
    ]
    if busy:
        top = max(b[2] or 0 for b in busy)
        lines.append(
            f"\nGenerators: busiest process used {top:.0%} of a CPU "
            f"({len(result['runs'])} repetition(s)).\n"
        )
    for run_ in result["runs"][:1]:
        for name in run_:
            for phase_name in ("init", "full"):
                if phase_name in run_[name]:
                    found = run_[name][phase_name]
                    answered = max(1, found["answered"])
                    by = {
                        k: round(1e6 * v / answered)
                        for k, v in found["responder_cpu_by_process"].items()
                        if v
                    }
                    lines.append(
                        f"{name}, {phase_name} phase, CPU us per answer by process "
                        f"(first repetition): `{json.dumps(by)}`\n"
                    )
    for run_ in result["runs"][:1]:
        for name in run_:
            found = run_[name].get("full")
            if found and found["answered"]:
                per_sa = {
                    k: round(v / found["answered"])
                    for k, v in found["rss_growth_by_process"].items()
                    if v
                }
                lines.append(
                    f"{name}: RSS growth per established SA by process (first repetition): "
                    f"`{json.dumps(per_sa)}`\n"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000.0, help="IKE_SA_INIT/s offered")
    parser.add_argument("--duration", type=float, default=10.0, help="s of the init phase")
    parser.add_argument("--saturate", type=float, default=4000.0, help="offered/s, saturated")
    parser.add_argument("--probe-seconds", type=float, default=3.0)
    parser.add_argument(
        "--half-open",
        type=int,
        default=6000,
        help="half-open SAs to fill (late answers and the probe after add their own: "
        "ikefarm's ceiling is max-count = 10000)",
    )
    parser.add_argument("--full-rate", type=float, default=100.0, help="full handshakes/s")
    parser.add_argument("--established", type=int, default=2000, help="SAs for memory")
    parser.add_argument("--procs", type=int, default=2, help="generator processes per load")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1],
        help="ikefarm ike workers; several numbers: one farm each, measured in the same run",
    )
    parser.add_argument(
        "--table-established", type=int, default=10000, help="established SAs, table phase"
    )
    parser.add_argument(
        "--table-half-open", type=int, default=6000, help="half-open SAs, table phase"
    )
    parser.add_argument("--repeat", type=int, default=1, help="interleaved repetitions")
    parser.add_argument(
        "--phases",
        nargs="+",
        default=["init", "flat", "full"],
        choices=["init", "flat", "table", "full"],
    )
    parser.add_argument("--results", type=Path, help="append a Markdown section to this file")
    parser.add_argument("--profile", type=Path, help="py-spy ikefarm's services into this dir")
    parser.add_argument("--note", default="", help="a sentence for the Markdown section")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: the benchmark makes network namespaces")
    PROFILE["dir"] = args.profile
    with tempfile.TemporaryDirectory(prefix="ikefarm-bench-") as tmp:
        result = run(args, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.results is not None:
        command = "ops/bench/handshake " + " ".join(argv if argv is not None else sys.argv[1:])
        with args.results.open("a") as handle:
            handle.write(markdown(result, command.strip(), args.note))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
