"""Shared fixtures: a real Redis with a fresh key prefix per test, real HTTP servers on free ports,
a self-signed certificate for TLS servers.

Every test gets its own prefix (``bbt:<hex>:``) and its keys are deleted afterwards, so tests can
run against a shared Redis without seeing each other.

``cluster_redis`` is the same on a local 3-master Redis Cluster, started once (idempotently) by
``scripts/services.sh --cluster`` the first time a test asks for it; the test is skipped, saying
why, when the cluster cannot be started. ``private_cluster`` is a 3-master cluster of the test's
own, for tests that stop a master's process.

A test marked ``cluster_too`` runs twice: ``[redis]`` on the one Redis and ``[cluster]`` with its
``redis`` fixture a ``RedisCluster`` client and its ``keys`` fixture the cluster key layout
(:attr:`pipeline.keys.Keys.cluster`); the ``[cluster]`` run is skipped, saying why, when the
cluster cannot be started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
from aiohttp import web

from bench.common import cluster_port
from pipeline.keys import Keys
from pipeline.streams import Redis, connect

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent
#: The local cluster's nodes (``scripts/services.sh --cluster`` reads the same variable).
CLUSTER_PORTS = os.environ.get("BB_CLUSTER_PORTS", "7001 7002 7003").split()
MQTT_HOST = "127.0.0.1"
MQTT_PORT = 1883
#: Genuine Particle/TTS payloads, each beside a ``.src.txt`` saying where it came from.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def closed_port() -> Iterator[int]:
    """A port of 127.0.0.1 that refuses connections for as long as the block runs.

    Bound here without ``SO_REUSEADDR`` and never listening: a connection is refused at once,
    and no server (another test's, another process's) can be given the port meanwhile — a port
    that is merely free now may be listening a moment later, and then a client expecting a
    refusal waits for an answer instead.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
def prefix() -> str:
    return f"bbt:{uuid.uuid4().hex[:10]}:"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``cluster_too`` tests run on one Redis and on the cluster (module docstring)."""
    if ("backend" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("cluster_too") is not None):
        metafunc.parametrize("backend", ["redis", "cluster"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """``redis`` (one Redis) or ``cluster`` (the local Redis Cluster, cluster key layout)."""
    return str(getattr(request, "param", "redis"))


@pytest.fixture
def keys(prefix: str, backend: str) -> Keys:
    return Keys(prefix, cluster=backend == "cluster")


@pytest.fixture
async def redis(prefix: str, backend: str, request: pytest.FixtureRequest
                ) -> AsyncIterator[Redis]:
    url = request.getfixturevalue("cluster_url") if backend == "cluster" else REDIS_URL
    client = connect(url)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, say so clearly
        if backend == "cluster":
            pytest.skip(f"the Redis Cluster at {url} does not answer: {exc}")
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc} (run .ci/run or start it)")
    yield client
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def redis_yaml(redis: Redis, backend: str, prefix: str, request: pytest.FixtureRequest) -> str:
    """The ``redis:`` section of a bridge configuration on this test's backend: one Redis, or
    the cluster with three partitions (a device's keys and its commands' stream partition then
    differ for many devices). Asks for ``redis``, so the test's keys are deleted after it."""
    if backend == "cluster":
        url = request.getfixturevalue("cluster_url")
        return f'{{url: "{url}", prefix: "{prefix}", partitions: 3}}'
    return f'{{url: "{REDIS_URL}", prefix: "{prefix}"}}'


@pytest.fixture(scope="session")
def cluster_url() -> str:
    """``redis+cluster://`` URL of the local 3-master cluster, started if it is not up."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("Redis Cluster tests need redis-server and redis-cli")
    try:
        done = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "--cluster"],
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("scripts/services.sh --cluster did not finish within 180 s")
    if done.returncode != 0:
        pytest.skip(f"no local Redis Cluster (scripts/services.sh --cluster): "
                    f"{(done.stderr or done.stdout).strip()}")
    return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in CLUSTER_PORTS)


@pytest.fixture
async def cluster_redis(cluster_url: str, prefix: str) -> AsyncIterator[Redis]:
    """A ``RedisCluster`` client; the test's keys are deleted from every master afterwards."""
    client = connect(cluster_url)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, say so clearly
        pytest.skip(f"the Redis Cluster at {cluster_url} does not answer: {exc}")
    yield client
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[tuple[str, dict[int, int]]]:
    """A 3-master cluster of this test's own (free ports, its own directory): the URL and
    port → pid of each node, so the test may stop one. Stopped (SIGTERM) afterwards."""
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli")
    ports = [cluster_port() for _ in range(3)]
    env = {**os.environ, "BB_CLUSTER_PORTS": " ".join(map(str, ports)),
           "BB_CLUSTER_DIR": str(tmp_path / "cluster"),
           # Longer than the test's stop, on a loaded machine: the master is stopped, not
           # failed over (there are no replicas), and the others keep serving meanwhile.
           "BB_CLUSTER_NODE_TIMEOUT_MS": "60000"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "services.sh"), "--cluster"],
                          capture_output=True, text=True, timeout=180, env=env)
    pids = {}
    for p in ports:
        pidfile = tmp_path / "cluster" / str(p) / "redis.pid"
        if pidfile.exists():
            pids[p] = int(pidfile.read_text())
    try:
        if done.returncode != 0:
            pytest.skip(f"could not start a private cluster: {done.stderr.strip()}")
        yield "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports), pids
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGTERM)


@asynccontextmanager
async def serve_app(app: web.Application, port: int | None = None) -> AsyncIterator[str]:
    """Run an aiohttp app on 127.0.0.1 and an unused port; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    port = port or free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
def fixture_path() -> Callable[[str], Path]:
    def get(name: str) -> Path:
        path = FIXTURES / name
        if not path.exists():
            pytest.fail(f"fixture {path} missing from tests/fixtures/")
        return path

    return get


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl CLI")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key
