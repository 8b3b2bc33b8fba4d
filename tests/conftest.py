"""Shared fixtures: a real Redis with a fresh key prefix per test, real HTTP servers on free ports,
a self-signed certificate for TLS servers.

Every test gets its own prefix (``bbt:<hex>:``) and its keys are deleted afterwards, so tests can
run against a shared Redis without seeing each other.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web

from pipeline.keys import Keys
from pipeline.streams import Redis, connect

REDIS_URL = "redis://127.0.0.1:6379/0"
MQTT_HOST = "127.0.0.1"
MQTT_PORT = 1883
#: Genuine Particle/TTS payloads, each beside a ``.src.txt`` saying where it came from.
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def prefix() -> str:
    return f"bbt:{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def keys(prefix: str) -> Keys:
    return Keys(prefix)


@pytest.fixture
async def redis(prefix: str) -> AsyncIterator[Redis]:
    client = connect(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # pragma: no cover - environment problem, say so clearly
        pytest.fail(f"Redis is not reachable at {REDIS_URL}: {exc} (run .ci/run or start it)")
    yield client
    async for key in client.scan_iter(match=f"{prefix}*", count=1000):
        await client.delete(key)
    await client.aclose()


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
