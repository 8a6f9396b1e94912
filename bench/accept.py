#!/usr/bin/env python3
"""Durable accept throughput of relaygw, next to a private Postfix instance.

Both servers get the same load from Postfix's ``smtp-source``: 4 KiB message
bodies, one SMTP connection per message, N sessions in parallel. Both relay
the bench domain to a next hop that is down (127.0.0.1:1), so every accepted
message stays spooled and the figure measures accept (fsynced queue write)
plus the deferral it causes (a refused connection, or none while the dead
next hop is suspended), not delivery.

Run from the repository root::

    .venv/bin/python bench/accept.py                  # 1000 msgs, 1/10/50 sessions, 3 runs
    .venv/bin/python bench/accept.py --quick          # a few seconds, for a smoke test
    .venv/bin/python bench/accept.py --no-postfix     # relaygw only

The Postfix instance is private: its own main.cf/master.cf, queue and data
directories in a temporary directory, started with ``postfix -c DIR``; the
system's /etc/postfix is read but never changed. It needs root (mail_owner
``postfix``, setgid_group ``postdrop``, as installed by the Debian package).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

BENCH_DOMAIN = "bench.test"
SENDER = f"from@{BENCH_DOMAIN}"
RECIPIENT = f"to@{BENCH_DOMAIN}"
BODY_BYTES = 4096
DEAD_NEXT_HOP = ("127.0.0.1", 1)
RELAYGW_ADDRESS = "127.0.0.71"
POSTFIX_ADDRESS = "127.0.0.72"
WARMUP_MESSAGES = 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A setup or measurement step failed; the message says which."""


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

    def cpu_seconds(self) -> float:
        """CPU used by the server so far (all its processes)."""
        raise NotImplementedError

    def queued(self) -> int | None:
        """How many messages are in its queue, or None if unknown."""
        return None

    def describe(self) -> str:
        """One line describing the setup."""
        raise NotImplementedError

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
    """relaygw under ``twistd -n``, relaying the bench domain to a dead next hop."""

    name = "relaygw"

    def __init__(self, workdir: Path, address: str = RELAYGW_ADDRESS) -> None:
        self.workdir = workdir
        self.address = address
        self.port = free_port(address)
        self.config = workdir / "relaygw.toml"
        self.spool = workdir / "spool"
        self.log = workdir / "twistd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.banner = ""
        self.twistd = str(Path(sys.executable).with_name("twistd"))
        self.relaygwctl = str(Path(sys.executable).with_name("relaygwctl"))

    def write_config(self) -> None:
        """The TOML config: one smtp listener, a relay route to a down next hop."""
        host, port = DEAD_NEXT_HOP
        self.config.write_text(f"""\
[server]
hostname = "relaygw.{BENCH_DOMAIN}"

[[listener]]
endpoint = "tcp:{self.port}:interface={self.address}"
kind = "smtp"

[limits]
max_connections = 1000
max_connections_per_client = 1000

[relay]
trusted_networks = ["127.0.0.0/8"]

[queue]
directory = "{self.spool}"
retry_schedule = ["1h"]
max_age = "5d"

[[route]]
domains = ["{BENCH_DOMAIN}"]
action = "relay"
via = "{host}:{port}"
tls = "none"
""")

    def start(self) -> None:
        """Start twistd and wait for its banner."""
        if not os.access(self.twistd, os.X_OK):
            raise BenchError(f"no twistd next to {sys.executable}; run with the project venv")
        self.write_config()
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [self.twistd, "-n", "--pidfile=", "relaygw", "--config", str(self.config)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)  # a Ctrl-C reaches us, and we stop it in order
        try:
            self.banner = wait_for_banner(self.address, self.port,
                                          lambda: self.proc is not None
                                          and self.proc.poll() is None, 30, "relaygw")
        except BenchError as e:
            raise BenchError(f"{e}; twistd log:\n{tail(self.log)}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            print("relaygw: no exit 15s after SIGTERM; killing it", file=sys.stderr)
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

    def describe(self) -> str:
        return (f"relaygw: twistd -n relaygw on {self.address}:{self.port}, relay route via "
                f"{DEAD_NEXT_HOP[0]}:{DEAD_NEXT_HOP[1]} (down: messages stay spooled), "
                f"retry_schedule 1h")

    def errors(self) -> list[str]:
        """Log lines that look like failures (tracebacks, errors)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        markers = ("Traceback", "Unhandled", "#error]", "#critical]")
        return [line for line in text.splitlines() if any(m in line for m in markers)]


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
    """A private Postfix instance (``postfix -c DIR``) relaying to a dead next hop."""

    name = "postfix"

    def __init__(self, workdir: Path, address: str = POSTFIX_ADDRESS) -> None:
        self.workdir = workdir
        self.address = address
        self.port = free_port(address)
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
        host, port = DEAD_NEXT_HOP
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
""")
        (self.confdir / "master.cf").write_text(
            POSTFIX_MASTER_CF.format(address=self.address, port=self.port))

    def run_postfix(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``postfix -c CONFDIR ARGS``; its fatal messages go to the maillog file."""
        return subprocess.run([self.postfix, "-c", str(self.confdir), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout)

    def start(self) -> None:
        """Create the queue, check, start, wait for the banner."""
        # Daemons open files as 'postfix': it must reach the temp dir.
        for directory in (self.workdir.parent, self.workdir):
            os.chmod(directory, 0o755)
        self.write_config()
        self.queue_dir.mkdir(mode=0o755)
        self.data_dir.mkdir(mode=0o700)
        shutil.chown(self.data_dir, user="postfix")
        version = subprocess.run(["postconf", "-c", str(self.confdir), "-h", "mail_version"],
                                 capture_output=True, text=True)
        self.version = version.stdout.strip()
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
        host, port = DEAD_NEXT_HOP
        return (f"postfix {self.version}: private instance on {self.address}:{self.port}, "
                f"relayhost [{host}]:{port} (down: messages stay queued), chroot off, "
                f"in_flow_delay 0, no peername lookup")


# --------------------------------------------------------------------------- load


@dataclass
class Sample:
    """One measured run."""

    rate: float  # messages per second
    cpu_per_msg: float  # server CPU seconds per message


@dataclass
class Results:
    """Samples per (server name, sessions)."""

    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)

    def add(self, name: str, sessions: int, sample: Sample) -> None:
        self.samples.setdefault((name, sessions), []).append(sample)

    def get(self, name: str, sessions: int) -> list[Sample]:
        return self.samples.get((name, sessions), [])


def run_load(smtp_source: str, server: Server, count: int, sessions: int) -> float:
    """Send ``count`` messages over ``sessions`` parallel sessions; elapsed seconds."""
    command = [smtp_source, "-l", str(BODY_BYTES), "-m", str(count), "-s", str(sessions),
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


def measure(smtp_source: str, server: Server, count: int, sessions: int) -> Sample:
    """One run: settle, load, settle; the rate and the CPU per message it cost."""
    server.settle()
    cpu_before = server.cpu_seconds()
    elapsed = run_load(smtp_source, server, count, sessions)
    # The CPU figure includes the deferral work the messages caused after the run.
    server.settle()
    cpu = server.cpu_seconds() - cpu_before
    return Sample(rate=count / elapsed, cpu_per_msg=cpu / count)


# --------------------------------------------------------------------------- report


def summary(values: list[float], fmt: str) -> str:
    """``median (min-max)`` of values, or ``-``."""
    if not values:
        return "-"
    med = statistics.median(values)
    if len(values) == 1:
        return format(med, fmt)
    return f"{med:{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"


def table(results: Results, names: list[str], sessions_list: list[int]) -> str:
    """The results table: medians (min-max) per server and session count, with ratio."""
    headers = ["sessions"]
    for name in names:
        headers += [f"{name} msg/s", f"{name} CPU ms/msg"]
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
            medians.append(statistics.median(rates) if rates else 0.0)
        if len(names) == 2:
            row.append(f"{medians[0] / medians[1]:.2f}" if medians[1] else "-")
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1000, help="messages per run (default 1000)")
    p.add_argument("--sessions", default="1,10,50",
                   help="comma-separated parallel session counts (default 1,10,50)")
    p.add_argument("--runs", type=int, default=3, help="runs per session count (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="small counts and one run (a smoke test: a few seconds)")
    p.add_argument("--no-postfix", action="store_true", help="measure relaygw only")
    p.add_argument("--no-relaygw", action="store_true", help="measure Postfix only")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp"),
                   help="where the temporary spools go; must be a real disk for fsync "
                        "to mean anything (default /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    try:
        args.sessions_list = [int(s) for s in args.sessions.split(",") if s.strip()]
    except ValueError:
        p.error("--sessions: comma-separated integers, e.g. 1,10,50")
    if args.quick:
        args.count = min(args.count, 100)
        args.runs = 1
    if args.count < 1 or args.runs < 1 or not args.sessions_list \
            or min(args.sessions_list) < 1:
        p.error("--count, --runs and every --sessions value must be at least 1")
    if args.no_relaygw and args.no_postfix:
        p.error("--no-relaygw and --no-postfix leave nothing to measure")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP: unwind like Ctrl-C so every server and temp dir is cleaned up."""
    raise KeyboardInterrupt


@contextlib.contextmanager
def running(server: Relaygw | Postfix) -> Iterator[Server]:
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


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 on a failure, 130 on interruption."""
    args = parse_args(argv)
    smtp_source = find_tool("smtp-source")
    if smtp_source is None:
        print("accept.py: smtp-source not found (Debian package 'postfix')", file=sys.stderr)
        return 1
    use_postfix = not args.no_postfix
    if use_postfix:
        reason = Postfix.available()
        if reason:
            print(f"accept.py: skipping Postfix: {reason}", file=sys.stderr)
            use_postfix = False
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    args.workdir.mkdir(parents=True, exist_ok=True)
    top = Path(tempfile.mkdtemp(prefix="relaygw-bench-", dir=args.workdir))
    fs_type = filesystem_type(top)
    results = Results()
    try:
        with contextlib.ExitStack() as stack:
            servers: list[Server] = []
            if not args.no_relaygw:
                (top / "relaygw").mkdir()
                servers.append(stack.enter_context(running(Relaygw(top / "relaygw"))))
            if use_postfix:
                (top / "postfix").mkdir()
                servers.append(stack.enter_context(running(Postfix(top / "postfix"))))
            print(f"durable accept: {BODY_BYTES}-byte bodies (+~130 bytes of headers) from "
                  f"smtp-source, one connection per message, {args.count} messages per run, "
                  f"{args.runs} run(s), {os.cpu_count()} CPU(s) shared by load and server")
            print(f"load average before: {load_average()}")
            print(f"spool on {fs_type} ({top})"
                  + ("  WARNING: tmpfs, fsync is free here" if fs_type == "tmpfs" else ""))
            for server in servers:
                print(f"  {server.describe()}")
            for server in servers:  # warm-up: imports, process pools, first deferral
                run_load(smtp_source, server, WARMUP_MESSAGES, 1)
            sent = dict.fromkeys((s.name for s in servers), WARMUP_MESSAGES)
            for sessions in args.sessions_list:
                for run in range(args.runs):
                    for server in servers:  # interleaved, so drift hits both alike
                        sample = measure(smtp_source, server, args.count, sessions)
                        sent[server.name] += args.count
                        results.add(server.name, sessions, sample)
                        print(f"  {server.name:8} sessions={sessions:<3} run {run + 1}: "
                              f"{sample.rate:7.1f} msg/s, "
                              f"{sample.cpu_per_msg * 1000:6.2f} ms CPU/msg", flush=True)
            print(f"load average after: {load_average()} (other work on the machine skews "
                  f"the figures; the ratio less so, runs are interleaved)")
            print()
            print("messages/second, median (min-max); server CPU ms per message "
                  "(includes deferring the message)")
            print(table(results, [s.name for s in servers], args.sessions_list))
            for server in servers:
                queued = server.queued()
                if queued is not None and queued != sent[server.name]:
                    print(f"WARNING: {server.name} queue holds {queued} messages, "
                          f"{sent[server.name]} were accepted")
                elif queued is not None:
                    print(f"{server.name}: all {queued} accepted messages are in its queue")
                else:
                    print(f"{server.name}: queue not counted ({server.name}ctl queue list "
                          f"--json unavailable)")
                if isinstance(server, Relaygw):
                    errors = server.errors()
                    if errors:
                        print(f"WARNING: relaygw logged {len(errors)} error line(s), "
                              f"e.g. {errors[0][:200]}")
    except BenchError as e:
        print(f"accept.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("accept.py: interrupted; servers stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
