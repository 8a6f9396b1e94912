"""What the scenarios of bench/run.py share: servers under test, load, tables.

``Relaygw`` runs ``twistd -n relaygw`` with a generated config; ``Postfix``
is a private Postfix instance (``postfix -c DIR``: its own main.cf/master.cf,
queue and data directories in a temporary directory; the system's
/etc/postfix is read but never changed; root needed). Both relay the bench
domain to one next hop that the benchmark chooses. ``run_load`` drives a
server with Postfix's ``smtp-source``; ``table`` prints medians (min-max).

Imported by the modules next to it (``python bench/run.py`` puts bench/ on
``sys.path``); not part of the relaygw package.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol, TypeVar

BENCH_DOMAIN = "bench.test"
SENDER = f"from@{BENCH_DOMAIN}"
RECIPIENT = f"to@{BENCH_DOMAIN}"
BODY_BYTES = 4096
RELAYGW_ADDRESS = "127.0.0.71"
POSTFIX_ADDRESS = "127.0.0.72"
WARMUP_MESSAGES = 20
# A next hop that refuses connections: accepted mail stays queued.
DEAD_NEXT_HOP = ("127.0.0.1", 1)
CLK_TCK = os.sysconf("SC_CLK_TCK")
METRIC_LINE = re.compile(r"^([a-zA-Z_:][^\s]*)\s+(\S+)$")  # Prometheus text: name{labels} value


class BenchError(Exception):
    """A setup or measurement step failed; the message says which."""


@dataclass(frozen=True)
class Settings:
    """What bench/run.py was asked for, as the scenarios use it."""

    top: Path  # this run's temporary directory (spools, configs, logs)
    smtp_source: str
    postfix: bool  # measure a private Postfix beside relaygw
    runs: int
    count: int  # 4 KiB messages per run (a, b)
    large_count: int  # 1 MiB messages per run (c)
    idle_sessions: int  # relaygw's idle sessions (d)
    postfix_idle_sessions: int  # Postfix's idle sessions (d): one process each
    spool_messages: int  # queued messages (e)
    idle_window: float  # seconds of the idle CPU measurement (e)


# --------------------------------------------------------------------------- helpers


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.05) -> None:
    """Poll ``condition`` until true; BenchError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def free_port(address: str) -> int:
    """A TCP port that is free on ``address`` right now."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def smtp_banner(address: str, port: int) -> str | None:
    """The greeting line of the SMTP server at address:port, or None if none answers."""
    try:
        with socket.create_connection((address, port), timeout=2) as s:
            s.settimeout(5)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(512)
                if not chunk:
                    return None
                data += chunk
            with contextlib.suppress(OSError):
                s.sendall(b"QUIT\r\n")
            return data.split(b"\n", 1)[0].decode("ascii", "replace").strip()
    except OSError:
        return None


def wait_for_banner(address: str, port: int, alive: Callable[[], bool], timeout: float,
                    what: str) -> str:
    """Wait until a 220 greeting comes from address:port while ``alive()`` holds."""
    banner: list[str] = []

    def ready() -> bool:
        if not alive():
            raise BenchError(f"{what} exited during start-up")
        line = smtp_banner(address, port)
        if line is not None and line.startswith("220"):
            banner.append(line)
            return True
        return False

    wait_for(ready, timeout, f"{what} to greet on {address}:{port}", interval=0.1)
    return banner[0]


def proc_cpu(pid: int, children: bool = False) -> float:
    """CPU seconds (user+sys) of ``pid`` from /proc; with ``children``, of reaped ones too."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def child_pids(parent: int) -> list[int]:
    """Live processes whose parent is ``parent``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(entry.name))
    return pids


def proc_status_kib(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (``VmHWM``, ``VmRSS``), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return None


def pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` (shared pages split among their users), or None."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def memory_kib(pids: Sequence[int]) -> tuple[int, int]:
    """Sum of RSS and of PSS (KiB) over ``pids``; a process gone meanwhile counts 0."""
    return (sum(proc_status_kib(pid, "VmRSS") or 0 for pid in pids),
            sum(pss_kib(pid) or 0 for pid in pids))


def raise_nofile(wanted: int) -> int:
    """Raise this process's RLIMIT_NOFILE (children inherit it) towards ``wanted``.

    The soft limit goes up to the hard one; as root the hard one too. Returns
    the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    if hard < wanted and os.geteuid() == 0:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    return min(wanted, hard)


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM of ``pid`` to its current RSS (``5`` into clear_refs); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a text file (empty if unreadable)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def filesystem_type(path: Path) -> str:
    """The type of the filesystem holding ``path`` (per /proc/mounts)."""
    best, kind = "", "unknown"
    target = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as mounts:
        for line in mounts:
            parts = line.split()
            mount_point = parts[1].replace("\\040", " ")
            inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) >= len(best):
                best, kind = mount_point, parts[2]
    return kind


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, from /proc/loadavg."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def find_tool(name: str) -> str | None:
    """Path of a Postfix tool: PATH first, then /usr/sbin."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/sbin") / name
    return str(candidate) if os.access(candidate, os.X_OK) else None


# --------------------------------------------------------------------------- servers


class Server:
    """A mail server under test: address, port, CPU accounting, queue size."""

    name = "server"
    address = "127.0.0.1"
    port = 0
    log: Path  # its log file

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def cpu_seconds(self) -> float:
        """CPU used by the server so far (all its processes)."""
        raise NotImplementedError

    def queued(self) -> int | None:
        """How many messages are in its queue, or None if unknown."""
        return None

    def describe(self) -> str:
        """One line describing the setup."""
        raise NotImplementedError

    def log_lines(self, *markers: str) -> list[str]:
        """Lines of the server's log (twistd's, or Postfix's maillog) with any of ``markers``."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if any(m in line for m in markers)]

    def settle(self, timeout: float = 30.0) -> None:
        """Wait until the server stops using CPU (its deferrals are done)."""
        window = 0.3
        last = [self.cpu_seconds()]

        def quiet() -> bool:
            time.sleep(window)  # sampling window of the CPU meter, not a wait for a condition
            now = self.cpu_seconds()
            idle = now - last[0] <= 0.02
            last[0] = now
            return idle

        try:
            wait_for(quiet, timeout, f"{self.name} to go idle", interval=0)
        except BenchError as e:
            print(f"WARNING: {e}; measuring anyway", file=sys.stderr)


class Relaygw(Server):
    """relaygw under ``twistd -n``, relaying the bench domain to ``next_hop``.

    ``route_note`` follows the next hop in ``describe()``; ``queue`` is extra
    lines for the ``[queue]`` table (retry_schedule, ...): none means its defaults;
    ``limits`` are ``[limits]`` keys and TOML values over the bench's own;
    ``metrics`` adds a ``[metrics] listen`` on a free port of ``address``.
    """

    name = "relaygw"

    def __init__(self, workdir: Path, next_hop: tuple[str, int], *,
                 address: str = RELAYGW_ADDRESS, queue: Sequence[str] = (),
                 limits: Mapping[str, str] | None = None, metrics: bool = False,
                 route_note: str = "") -> None:
        self.workdir = workdir
        self.next_hop = next_hop
        self.address = address
        self.port = free_port(address)
        self.queue_lines = list(queue)
        self.limits = {"max_connections": "1000", "max_connections_per_client": "1000",
                       **(limits or {})}
        self.metrics_port = free_port(address) if metrics else None
        self.route_note = route_note
        self.config = workdir / "relaygw.toml"
        self.spool = workdir / "spool"
        self.log = workdir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.banner = ""
        self.twistd = str(Path(sys.executable).with_name("twistd"))
        self.relaygwctl = str(Path(sys.executable).with_name("relaygwctl"))

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def write_config(self) -> None:
        """The TOML config: one smtp listener, a relay route to the next hop."""
        host, port = self.next_hop
        queue = "".join(f"{line}\n" for line in self.queue_lines)
        limits = "".join(f"{key} = {value}\n" for key, value in self.limits.items())
        metrics = (f'[metrics]\nlisten = "tcp:{self.metrics_port}:interface={self.address}"\n\n'
                   if self.metrics_port is not None else "")
        self.config.write_text(f"""\
[server]
hostname = "relaygw.{BENCH_DOMAIN}"

[[listener]]
endpoint = "tcp:{self.port}:interface={self.address}"
kind = "smtp"

[limits]
{limits}
{metrics}[relay]
trusted_networks = ["127.0.0.0/8"]

[queue]
directory = "{self.spool}"
{queue}
[[route]]
domains = ["{BENCH_DOMAIN}"]
action = "relay"
via = "{host}:{port}"
tls = "none"
""")

    def start(self) -> None:
        """Start twistd and wait for its banner."""
        self.launch()
        try:
            self.banner = wait_for_banner(self.address, self.port, self.alive, 30, "relaygw")
        except BenchError as e:
            raise BenchError(f"{e}; twistd log:\n{tail(self.log)}") from None

    def launch(self) -> float:
        """Write the config and start twistd; the ``time.monotonic()`` just before."""
        if not os.access(self.twistd, os.X_OK):
            raise BenchError(f"no twistd next to {sys.executable}; run with the project venv")
        self.write_config()
        with open(self.log, "ab") as log:
            started = time.monotonic()
            self.proc = subprocess.Popen(
                [self.twistd, "-n", "--pidfile=", "relaygw", "--config", str(self.config)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a Ctrl-C reaches us, and we stop it in order
        return started

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def metrics(self, timeout: float = 5.0) -> dict[str, float] | None:
        """The samples of ``/metrics`` (name with labels -> value); None if it does not answer."""
        if self.metrics_port is None:
            return None
        try:
            with urllib.request.urlopen(
                    f"http://{self.address}:{self.metrics_port}/metrics", timeout=timeout) as r:
                text = r.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return None
        samples = {}
        for line in text.splitlines():
            if match := METRIC_LINE.match(line):
                samples[match[1]] = float(match[2])
        return samples

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            print("relaygw: no exit 30s after SIGTERM; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()
        if proc.returncode not in (0, -signal.SIGTERM):
            print(f"relaygw: exit status {proc.returncode} after SIGTERM", file=sys.stderr)

    def cpu_seconds(self) -> float:
        return proc_cpu(self.proc.pid, children=True) if self.proc else 0.0

    def queued(self) -> int | None:
        """Messages in the spool, per ``relaygwctl queue list --json``."""
        if not os.access(self.relaygwctl, os.X_OK):
            return None
        try:
            out = subprocess.run(
                [self.relaygwctl, "--config", str(self.config), "queue", "list", "--json"],
                cwd=self.workdir, capture_output=True, timeout=120, check=True).stdout
            return len(json.loads(out))
        except (subprocess.SubprocessError, ValueError, OSError):
            return None

    def queue_size(self) -> int | None:
        """Messages the daemon holds, per ``relaygw_queue_messages`` (needs ``metrics``)."""
        scrape = self.metrics()
        if scrape is None or "relaygw_queue_messages" not in scrape:
            return None
        return int(scrape["relaygw_queue_messages"])

    def describe(self) -> str:
        host, port = self.next_hop
        return (f"relaygw: twistd -n relaygw on {self.address}:{self.port}, relay route via "
                f"{host}:{port}{self.route_note}")

    def errors(self) -> list[str]:
        """Log lines that look like failures (tracebacks, errors)."""
        return self.log_lines("Traceback", "Unhandled", "#error]", "#critical]")


POSTFIX_MASTER_CF = """\
{address}:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Postfix(Server):
    """A private Postfix instance (``postfix -c DIR``) relaying to ``relayhost``.

    ``extra_main_cf`` lines are appended to main.cf; ``route_note`` follows the
    relayhost in ``describe()``.
    """

    name = "postfix"

    def __init__(self, workdir: Path, relayhost: tuple[str, int], *,
                 address: str = POSTFIX_ADDRESS, extra_main_cf: Sequence[str] = (),
                 route_note: str = "") -> None:
        self.workdir = workdir
        self.relayhost = relayhost
        self.address = address
        self.port = free_port(address)
        self.extra_main_cf = list(extra_main_cf)
        self.route_note = route_note
        self.confdir = workdir / "conf"
        self.queue_dir = workdir / "queue"
        self.data_dir = workdir / "data"
        self.log = workdir / "maillog"
        self.postfix = find_tool("postfix") or "postfix"
        self.started = False
        self.master_pid: int | None = None
        self.version = ""
        self.banner = ""

    @staticmethod
    def available() -> str | None:
        """None if a private Postfix can run here, else the reason it cannot."""
        if find_tool("postfix") is None:
            return "postfix is not installed"
        if os.geteuid() != 0:
            return "a private Postfix instance needs root"
        import grp
        import pwd
        try:
            pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            return "no postfix user or postdrop group"
        return None

    def write_config(self) -> None:
        """main.cf and master.cf: everything in the temp dir, chroot off."""
        host, port = self.relayhost
        extra = "".join(f"{line}\n" for line in self.extra_main_cf)
        self.confdir.mkdir()
        (self.confdir / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {self.queue_dir}
data_directory = {self.data_dir}
mail_owner = postfix
setgid_group = postdrop
# inet_interfaces must name a configured address; the smtpd service in
# master.cf binds {self.address} itself.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.{BENCH_DOMAIN}
mydestination =
local_recipient_maps =
alias_maps =
alias_database =
relay_domains = {BENCH_DOMAIN}
mynetworks = 127.0.0.0/8
relayhost = [{host}]:{port}
# No reverse DNS for the client (relaygw does none either).
smtpd_peername_lookup = no
# No artificial back-pressure delay: measure raw accept.
in_flow_delay = 0s
biff = no
maillog_file_prefixes = {self.workdir}
maillog_file = {self.log}
{extra}""")
        (self.confdir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(address=self.address, port=self.port))

    def run_postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``postfix -c CONFDIR ARGS``; its fatal messages go to the maillog file."""
        return subprocess.run([self.postfix, "-c", str(self.confdir), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def postconf(self, *names: str) -> dict[str, str]:
        """The effective values of main.cf parameters (defaults included)."""
        result = subprocess.run([find_tool("postconf") or "postconf", "-c", str(self.confdir),
                                 *names], capture_output=True, text=True)
        values = {}
        for line in result.stdout.splitlines():
            name, sep, value = line.partition(" = ")
            if sep:
                values[name.strip()] = value.strip()
        return values

    def start(self) -> None:
        """Create the queue, check, start, wait for the banner."""
        # Daemons open files as 'postfix': it must reach the temp dir.
        for directory in (self.workdir.parent, self.workdir):
            os.chmod(directory, 0o755)
        self.write_config()
        self.queue_dir.mkdir(mode=0o755)
        self.data_dir.mkdir(mode=0o700)
        shutil.chown(self.data_dir, user="postfix")
        self.version = self.postconf("mail_version").get("mail_version", "")
        for step in ("check", "start"):
            if step == "start":
                self.started = True  # stop() must try even when start is interrupted
            result = self.run_postfix(step)
            if result.returncode != 0:
                raise BenchError(f"postfix -c {self.confdir} {step} failed "
                                 f"({result.returncode}): {result.stderr.strip()}\n"
                                 f"{tail(self.log)}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip().isdigit(),
                 10, "postfix master.pid")
        self.master_pid = int(pid_file.read_text().strip())
        try:
            self.banner = wait_for_banner(self.address, self.port,
                                          lambda: Path(f"/proc/{self.master_pid}").exists(),
                                          30, "postfix")
        except BenchError as e:
            raise BenchError(f"{e}; maillog:\n{tail(self.log)}") from None

    def instance_pids(self) -> list[int]:
        """Processes of this instance: those whose working directory is its queue."""
        pids = []
        queue = str(self.queue_dir)
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(entry / "cwd") == queue:
                        pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """``postfix stop``; then make sure no process of the instance is left."""
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.run_postfix("stop", timeout=30)
        try:
            wait_for(lambda: not self.instance_pids(), 10, "postfix processes to exit")
        except BenchError:
            for pid in self.instance_pids():
                print(f"postfix: killing leftover process {pid}", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(BenchError):
                wait_for(lambda: not self.instance_pids(), 5, "killed postfix processes")

    def cpu_seconds(self) -> float:
        """master (with reaped children) plus its live children."""
        if self.master_pid is None:
            return 0.0
        total = proc_cpu(self.master_pid, children=True)
        return total + sum(proc_cpu(pid) for pid in child_pids(self.master_pid))

    def queued(self) -> int | None:
        """Queue files in incoming, active, deferred and hold."""
        count = 0
        for sub in ("incoming", "active", "deferred", "hold"):
            count += sum(len(files) for _, _, files in os.walk(self.queue_dir / sub))
        return count

    def describe(self) -> str:
        host, port = self.relayhost
        return (f"postfix {self.version}: private instance on {self.address}:{self.port}, "
                f"relayhost [{host}]:{port}{self.route_note}, chroot off, "
                f"in_flow_delay 0, no peername lookup")


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One measured run."""

    rate: float  # messages per second
    cpu_per_msg: float  # server CPU seconds per message
    peak_rss_kib: int | None = None  # the server's peak RSS during the run, if measured


@dataclass
class Results:
    """Samples per (server name, sessions)."""

    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)

    def add(self, name: str, sessions: int, sample: Sample) -> None:
        self.samples.setdefault((name, sessions), []).append(sample)

    def get(self, name: str, sessions: int) -> list[Sample]:
        return self.samples.get((name, sessions), [])


def run_load(smtp_source: str, server: Server, count: int, sessions: int,
             body_bytes: int = BODY_BYTES) -> float:
    """Send ``count`` messages over ``sessions`` parallel sessions; elapsed seconds."""
    command = [smtp_source, "-l", str(body_bytes), "-m", str(count), "-s", str(sessions),
               "-M", "client.bench.test", "-f", SENDER, "-t", RECIPIENT,
               f"{server.address}:{server.port}"]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=max(120.0, count * 0.5))
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"smtp-source against {server.name} failed ({proc.returncode}): "
                         f"{(err or out).strip()[-500:]}")
    return elapsed


# --------------------------------------------------------------------------- report


def summary(values: list[float], fmt: str) -> str:
    """``median (min-max)`` of values, or ``-``."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


# An extra column per server: its header after the server's name, and the cell.
Column = tuple[str, Callable[[list[Sample]], str]]


def peak_rss_column(samples: list[Sample]) -> str:
    """Peak RSS in MiB, median (min-max), or ``-``."""
    return summary([s.peak_rss_kib / 1024 for s in samples if s.peak_rss_kib is not None],
                   ".0f")


def table(results: Results, names: list[str], sessions_list: list[int],
          extra: dict[str, list[Column]] | None = None) -> str:
    """The results table: medians (min-max) per server and session count, with ratio.

    ``extra`` adds columns after a server's own, e.g. ``{"relaygw": [("peak RSS MiB",
    peak_rss_column)]}``.
    """
    extra = extra or {}
    headers = ["sessions"]
    for name in names:
        headers += [f"{name} msg/s", f"{name} CPU ms/msg"]
        headers += [f"{name} {header}" for header, _ in extra.get(name, [])]
    if len(names) == 2:
        headers.append(f"{names[0]}/{names[1]}")
    rows = []
    for sessions in sessions_list:
        row = [str(sessions)]
        medians = []
        for name in names:
            samples = results.get(name, sessions)
            rates = [s.rate for s in samples]
            row.append(summary(rates, ".0f"))
            row.append(summary([s.cpu_per_msg * 1000 for s in samples], ".2f"))
            row += [cell(samples) for _, cell in extra.get(name, [])]
            medians.append(statistics.median(rates) if rates else 0.0)
        if len(names) == 2:
            row.append(ratio(medians[0], medians[1]))
        rows.append(row)
    return format_table(headers, rows)


def ratio(a: float | None, b: float | None) -> str:
    """``a/b`` to two decimals, or ``-`` when either is missing or b is zero."""
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}" if abs(a / b) >= 0.1 else f"{a / b:.2g}"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """Right-aligned columns under a dashed rule."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- processes


class Startable(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C so every server and temp dir is cleaned up."""
    raise KeyboardInterrupt


def unwind_on_termination() -> None:
    """Make SIGTERM and SIGHUP raise KeyboardInterrupt (servers get stopped in order)."""
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


@contextlib.contextmanager
def running(server: S) -> Iterator[S]:
    """Start ``server``; stop it whatever happens."""
    try:
        server.start()
        yield server
    finally:
        with shielded():
            server.stop()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ignore Ctrl-C, SIGTERM and SIGHUP for the duration: a second one must not stop a clean-up."""
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
