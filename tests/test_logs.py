"""Logs never carry credentials: not in messages, not in tracebacks, in either format."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.logs import ThrottledLog, setup_logging
from pipeline.redact import redact_text, safe_url

SECRET = "Zk8SECRETvalue0123456789"


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        h.close()
    root.handlers[:], root.level = handlers, level


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_credential_headers_are_masked_in_messages_and_tracebacks(
    fmt: str, tmp_path: Path, restore_root: None,
) -> None:
    path = tmp_path / "bridge.log"
    setup_logging("INFO", fmt, str(path))
    log = logging.getLogger("aiohttp.server")
    log.warning("bad request: Authorization: Basic %s", SECRET)
    try:
        # What aiohttp's parser raises: the bytes around the error, quoted.
        raise ValueError(f"Invalid header value char\n\n  b'X-Bridge-Secret: {SECRET}\\x01'\n ^")
    except ValueError:
        log.exception("Error handling request from %s", "10.0.0.1")
    for handler in logging.getLogger().handlers:
        handler.flush()
    text = path.read_text()
    assert "Error handling request from 10.0.0.1" in text and "Invalid header value" in text
    assert SECRET[:10] not in text


def test_redact_text_and_safe_url() -> None:
    assert SECRET not in redact_text(f"proxy-authorization: Bearer {SECRET}")
    assert SECRET not in redact_text(f"GET /external/api/update?token={SECRET}&V1=2")
    url = safe_url(f"redis://user:{SECRET}@redis.example:6380/1")
    assert SECRET[:10] not in url and url.startswith("redis://user:") and ":6380/1" in url


def test_a_throttled_log_prints_once_per_interval_and_counts_what_it_held_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = logging.getLogger("test.throttled")
    throttled = ThrottledLog(log, interval_s=3600.0, max_keys=2)
    with caplog.at_level(logging.INFO, logger="test.throttled"):
        for n in range(5):
            throttled.info(("rate",), "%d uplinks wait", n)
        throttled.warning(("peer", "a"), "refused %s", "a")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "0 uplinks wait"),
        (logging.WARNING, "refused a"),
    ]
    # Past the interval the next record carries the count of those held back.
    throttled.interval_s = 0.0
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test.throttled"):
        throttled.info(("rate",), "%d uplinks wait", 9)
    assert caplog.records[0].getMessage().startswith("9 uplinks wait (and 4 more in the last")


def test_a_throttled_log_forgets_its_oldest_key_past_max_keys(
    caplog: pytest.LogCaptureFixture,
) -> None:
    throttled = ThrottledLog(logging.getLogger("test.throttled2"), interval_s=3600.0, max_keys=2)
    with caplog.at_level(logging.INFO, logger="test.throttled2"):
        for key in ("a", "b", "c", "a"):
            throttled.info((key,), "key %s", key)
    # "a" was forgotten when "c" came, so it is printed again.
    assert [r.getMessage() for r in caplog.records] == ["key a", "key b", "key c", "key a"]
