"""A headless Chromium driven over the DevTools protocol (a websocket, with aiohttp).

No new dependency: Debian's ``chromium`` (``scripts/services.sh --install`` installs it) and
aiohttp, which the bridge already uses. :func:`chromium_path` is ``None`` when no Chromium is
installed; tests then skip, saying so. The browser gets a fresh profile in a temporary
directory and an unused DevTools port (``--remote-debugging-port=0``: it prints the one it
took), and is killed on exit.

:class:`Page` collects every console error, uncaught exception and error log entry
(``errors``), so a test can require a page that loads cleanly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp

_LISTENING = re.compile(rb"DevTools listening on (ws://\S+)")
SKIP_REASON = ("Chromium is not installed (Debian: apt-get install -y chromium; "
               "`scripts/services.sh --install` does it as root)")


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Page:
    """One browser tab: send DevTools commands, evaluate JavaScript, collect errors."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.errors: list[str] = []
        self._reader = asyncio.create_task(self._read(), name="devtools-reader")

    async def _read(self) -> None:
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._waiting.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method", ""), data.get("params", {})
            self._note_error(method, params)
            for fut in self._events.pop(method, []):
                if not fut.done():
                    fut.set_result(params)

    def _note_error(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in
                            params.get("args", []))
            self.errors.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.errors.append(f"uncaught: {text}")
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            self.errors.append(f"log ({entry.get('source')}): {entry.get('text')} "
                               f"{entry.get('url', '')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = fut
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        answer = await asyncio.wait_for(fut, 60)
        if "error" in answer:
            raise RuntimeError(f"DevTools {method}: {answer['error']}")
        result: dict[str, Any] = answer.get("result", {})
        return result

    def event(self, method: str) -> asyncio.Future[dict[str, Any]]:
        """A future for the next ``method`` event (ask before causing it)."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(fut)
        return fut

    async def goto(self, url: str) -> None:
        loaded = self.event("Page.loadEventFired")
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, 60)

    async def eval(self, expression: str) -> Any:
        """The value of a JavaScript expression (promises awaited); raises on exceptions."""
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                                 awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript failed: {result['exceptionDetails']}")
        return result.get("result", {}).get("value")

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        await self._ws.close()


@asynccontextmanager
async def chromium() -> AsyncIterator[Page]:
    """A headless Chromium with one blank tab, ready for :meth:`Page.goto`."""
    path = chromium_path()
    if path is None:
        raise RuntimeError(SKIP_REASON)
    with tempfile.TemporaryDirectory(prefix="bb-chromium-") as profile:
        args = [path, "--headless=new", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions", "--disable-sync",
                "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
        if os.geteuid() == 0:
            args.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        proc = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        assert proc.stderr is not None
        drain: asyncio.Task[None] | None = None
        try:
            seen: list[bytes] = []
            while True:
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                if not line:
                    raise RuntimeError("Chromium exited before DevTools listened: "
                                       + b"".join(seen[-20:]).decode(errors="replace"))
                seen.append(line)
                found = _LISTENING.search(line)
                if found:
                    break
            # Keep reading stderr, or Chromium blocks once the pipe is full.
            drain = asyncio.create_task(_drain(proc.stderr), name="chromium-stderr")
            port = found.group(1).decode().split("/")[2]
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://{port}/json/list") as resp:
                    targets = await resp.json(content_type=None)
                page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                ws = await http.ws_connect(page_url, max_msg_size=0)
                page = Page(ws)
                try:
                    for domain in ("Page", "Runtime", "Log"):
                        await page.send(f"{domain}.enable")
                    yield page
                finally:
                    await page.close()
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            if drain is not None:
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(65536):
        pass
