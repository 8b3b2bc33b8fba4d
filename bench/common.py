"""Shared helpers for benchmarks: child processes, a private Mosquitto, /proc readings, tables.

Everything here is Linux-only (``/proc``) and loopback-only. :class:`Processes` owns every child
it starts and stops them on exit, including on Ctrl-C and errors: children run in their own
process group (so a terminal's Ctrl-C reaches only the bench, which then stops them in order),
get SIGTERM, and are killed by pid after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Self

if TYPE_CHECKING:
    from pipeline.blynk.device_mqtt import Session

ROOT = Path(__file__).resolve().parent.parent
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class BenchError(RuntimeError):
    """The bench could not set up or run (a child died, a port never opened...)."""


class PortTaken(BenchError):
    """A child could not bind the port :func:`free_port` picked for it: another process took
    it in between (on a shared machine); the caller may try again with fresh ports."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (racy by nature; good enough on a quiet machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def pin_cpu(cpu: int) -> None:
    """Pin this process to one CPU so server and load generator do not share a core; no-op where
    the platform cannot pin or the machine has no such CPU."""
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > cpu:
        os.sched_setaffinity(0, {cpu})


def wait_port(port: int, timeout_s: float = 15.0, proc: Proc | None = None) -> None:
    """Block until something accepts on 127.0.0.1:``port``; raise if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        if proc is not None and proc.popen.poll() is not None:
            log = proc.log_path.read_text(errors="replace")
            error = PortTaken if "address already in use" in log else BenchError
            raise error(f"{proc.name} exited with {proc.popen.returncode} before opening "
                        f"port {port}; log: {proc.log_path}\n{proc.tail()}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise BenchError(f"nothing listens on 127.0.0.1:{port} after {timeout_s:.0f} s")
        time.sleep(0.05)


# --- /proc readings -------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / _CLK_TCK


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) in bytes from ``/proc/<pid>/status``."""
    rss = hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    return rss, hwm


@dataclass
class Usage:
    """CPU and memory of one process over a measured window."""

    name: str
    cpu_s: float
    wall_s: float
    rss: int
    peak_rss: int

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


class UsageProbe:
    """CPU delta and RSS of a set of pids between :meth:`start` and :meth:`stop`."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._cpu0: dict[str, float] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: _cpu_or_zero(pid) for name, pid in self.pids.items()}

    def stop(self) -> list[Usage]:
        wall = time.monotonic() - self._t0
        out = []
        for name, pid in self.pids.items():
            try:
                rss, peak = rss_bytes(pid)
            except OSError:
                rss = peak = 0
            out.append(Usage(name, _cpu_or_zero(pid) - self._cpu0.get(name, 0.0), wall,
                             rss, peak))
        return out


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


# --- statistics and tables ------------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def fmt_ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def fmt_mib(n: int) -> str:
    return f"{n / 1048576:.0f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True)))

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def machine() -> str:
    """One line naming the machine a figure was measured on."""
    model = "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return (f"{os.cpu_count()} cores ({model}), {mem / 1024:.0f} GiB, "
            f"Python {sys.version.split()[0]}, Linux {os.uname().release}")


# --- child processes ------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            lines = self.log_path.read_text(errors="replace").splitlines()
            return "\n".join("    " + x for x in lines[-n:])
        return ""


class Processes:
    """Owns child processes and a scratch directory; a context manager that cleans both up."""

    def __init__(self, keep_dir: bool = False) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bb-bench-"))
        self.keep_dir = keep_dir
        self.procs: list[Proc] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()
        if not self.keep_dir and et is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        elif et is not None:
            print(f"bench: logs kept in {self.dir}", file=sys.stderr)

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              cwd: Path | None = None, pipes: bool = False) -> Proc:
        """Start ``argv`` in its own process group, output to ``<dir>/<name>.log``; with
        ``pipes`` stdin and stdout are pipes to talk to it (stderr still goes to the log)."""
        log_path = self.dir / f"{name}.log"
        log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        full_env = {**os.environ, **(env or {})}
        popen = subprocess.Popen(list(argv), stdout=subprocess.PIPE if pipes else log,
                                 stderr=log if pipes else subprocess.STDOUT,
                                 stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                                 env=full_env, cwd=cwd or ROOT, start_new_session=True)
        proc = Proc(name, popen, log_path, log)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, grace_s: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.kill()
                proc.popen.wait(5)
        proc._log.close()
        if proc in self.procs:
            self.procs.remove(proc)
        return proc.popen.returncode

    def stop_all(self) -> None:
        # Newest first: the pipeline before the broker and the emulator it talks to.
        for proc in reversed(list(self.procs)):
            self.stop(proc, grace_s=5.0)

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{proc.name} exited with {proc.popen.returncode}; "
                                 f"log: {proc.log_path}\n{proc.tail()}")


MOSQUITTO_CONF = """\
# Private broker of one bench run. A default broker drops QoS 0 messages for a slow reader
# (max_queued_messages 1000) and Nagle adds latency: both would hide what is being measured.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_queued_messages 0
max_queued_bytes 0
max_inflight_messages 0
set_tcp_nodelay true
log_type error
log_type warning
"""


def mosquitto_binary() -> str:
    found = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
        None)
    if found is None:
        raise BenchError("mosquitto is not installed (apt-get install mosquitto)")
    return found


def start_mosquitto(procs: Processes, name: str = "mosquitto") -> tuple[Proc, int]:
    """A private Mosquitto on a free loopback port; returns (process, port)."""
    port = free_port()
    conf = procs.dir / f"{name}.conf"
    conf.write_text(MOSQUITTO_CONF.format(port=port))
    proc = procs.spawn(name, [mosquitto_binary(), "-c", str(conf)])
    wait_port(port, proc=proc)
    return proc, port


def start_redis(procs: Processes) -> int:
    """A private, non-persistent Redis on a free loopback port (its own CPU and memory to read)."""
    port = free_port()
    proc = procs.spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                 "--save", "", "--appendonly", "no", "--dir", str(procs.dir)])
    wait_port(port, proc=proc)
    return port


async def delete_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under a bench run's own prefix (never a flush: others share this Redis)."""
    from pipeline.streams import connect

    redis = connect(redis_url)
    try:
        async for key in redis.scan_iter(match=f"{prefix}*", count=1000):
            await redis.delete(key)
    finally:
        await redis.aclose()


async def go_and_collect(redis: Any, prefix: str, workers: int,
                         procs: Processes) -> list[dict[str, Any]]:
    """Release `workers` children blocked on `{prefix}go` and gather the JSON report each pushes
    to `{prefix}done`; checks once a second that no child died, so a crash fails the run."""
    await redis.rpush(f"{prefix}go", *["go"] * workers)
    reports: list[dict[str, Any]] = []
    while len(reports) < workers:
        got = await redis.blpop([f"{prefix}done"], timeout=1)
        if got is None:
            procs.check_alive()
            continue
        reports.append(json.loads(got[1]))
    return reports


async def redis_cpu_seconds(redis: Any) -> float:
    """User + system CPU seconds the Redis server has used (INFO cpu)."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


class SessionCounter:
    """Handler for device MQTT sessions a bench opens: ``ready`` is set once ``n`` of them are
    ready; closes are counted (and, with ``log_closes``, said on stderr), messages ignored."""

    def __init__(self, n: int, log_closes: bool = False) -> None:
        self.n = n
        self.log_closes = log_closes
        self.opened = 0
        self.closed = 0
        self.ready = asyncio.Event()

    def session_ready(self, s: Session) -> None:
        self.opened += 1
        if self.opened == self.n:
            self.ready.set()

    def session_message(self, s: Session, topic: str, payload: bytes) -> None:
        pass

    def session_closed(self, s: Session, reason: str) -> None:
        self.closed += 1
        if self.log_closes:
            print(f"closed: {reason}", file=sys.stderr)


# --- a minimal MQTT 3.1.1 QoS 0 publisher for load generators --------------------------------


def publish_packet(topic: bytes, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH packet (the bridge's own encoder, so the bench speaks what it parses)."""
    from pipeline import mqtt_frames

    return mqtt_frames.publish(topic.decode(), payload)


class Publisher:
    """A blocking MQTT 3.1.1 connection that only publishes QoS 0, Nagle off.

    Load generators need to put thousands of messages per second on the wire from one core
    without an event-loop round trip per message; this writes pre-built PUBLISH packets, many per
    ``sendall`` when it is behind. Keep-alive is off (0), so nothing needs to be read after the
    CONNACK; the broker closes the connection on a protocol error, which ``sendall`` reports.
    """

    def __init__(self, host: str, port: int, client_id: str, timeout_s: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        from pipeline import mqtt_frames

        # Clean session, keep-alive 0: nothing needs to be read after the CONNACK.
        self.sock.sendall(mqtt_frames.connect(client_id, keepalive_s=0))
        connack = self.sock.recv(4)
        if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
            raise BenchError(f"MQTT broker refused the connection: {connack!r}")
        self.sock.settimeout(None)

    def send(self, packets: bytes) -> None:
        self.sock.sendall(packets)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


@contextlib.contextmanager
def interrupt_as_exception() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt, so ``with Processes()`` cleans up on either
    (SIGINT explicitly: a shell starts background jobs with SIGINT ignored)."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM,)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
