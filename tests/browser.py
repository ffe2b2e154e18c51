"""A headless Chromium of a test's own (Debian's ``chromium``), driven over the DevTools protocol."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

#: How CI gets it (``.ci/run``); a test needing it fails with this instead of passing unseen.
INSTALL = "DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium"


class DevToolsError(Exception):
    """A DevTools command failed, or a script evaluated in the page threw."""


def chromium_path() -> str:
    """Where ``chromium`` is; fails the test (not skips it) when it is not installed."""
    found = shutil.which("chromium")
    if found is None:
        pytest.fail(f"Chromium is not installed (not on PATH); install it with: {INSTALL}")
    return found


class Page:
    """One tab, over its DevTools websocket. Uncaught script errors and console errors are kept."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = socket
        self._next_id = 0
        #: What went wrong in the page: uncaught exceptions and error log entries.
        self.errors: list[str] = []

    async def call(self, method: str, timeout: float = 30.0, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        asked = self._next_id
        await self._socket.send_json({"id": asked, "method": method, "params": params})
        async with asyncio.timeout(timeout):
            while True:
                message = await self._socket.receive_json()
                if message.get("id") == asked:
                    if "error" in message:
                        raise DevToolsError(f"{method}: {message['error']}")
                    result: dict[str, Any] = message.get("result", {})
                    return result
                self._note(message)

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append(details.get("exception", {}).get("description") or details.get("text", "?"))
        elif event.get("method") == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"{params['entry']['source']}: {params['entry']['text']}")

    async def navigate(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        answer = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise DevToolsError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page, saved at ``path``."""
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(shot["data"]))
        return path


class Chromium:
    """``async with Chromium(home) as browser``: started with a fresh profile under ``home``;
    stopped (its process group, which it alone is in) on the way out, whatever happened."""

    def __init__(self, home: Path, width: int = 1280, height: int = 960) -> None:
        self.home = home
        self._size = f"{width},{height}"
        self._process: subprocess.Popen[bytes] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._port = 0

    async def __aenter__(self) -> Chromium:
        executable = chromium_path()
        profile = self.home / "profile"
        profile.mkdir(parents=True, exist_ok=True)
        log = (self.home / "chromium.log").open("ab")
        self._process = subprocess.Popen(
            [
                executable,
                "--headless",
                "--no-sandbox",  # tests run as root, where Chromium's sandbox does not start
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                f"--window-size={self._size}",
                f"--user-data-dir={profile}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "about:blank",
            ],
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        try:
            self._port = await self._devtools_port(profile / "DevToolsActivePort")
            self._session = aiohttp.ClientSession()
        except BaseException:
            self._stop()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
        self._stop()

    async def _devtools_port(self, announced: Path, timeout: float = 30.0) -> int:
        """The port Chromium chose, from the file it writes in its profile once it listens."""
        assert self._process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = (self.home / "chromium.log").read_text(errors="replace")[-3000:]
                raise AssertionError(f"chromium exited with {self._process.returncode}; log:\n{log}")
            lines = announced.read_text().splitlines() if announced.exists() else []
            if lines and lines[0].isdigit():
                return int(lines[0])
            await asyncio.sleep(0.1)
        raise AssertionError(f"chromium did not open its DevTools port within {timeout} s")

    @contextlib.asynccontextmanager
    async def tab(self) -> Any:
        """The first tab, its runtime and log events on, for the ``async with`` block."""
        assert self._session is not None
        async with self._session.get(f"http://127.0.0.1:{self._port}/json/list") as response:
            targets = await response.json()
        target = next(t for t in targets if t["type"] == "page")
        async with self._session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as socket:
            page = Page(socket)
            for domain in ("Page", "Runtime", "Log"):
                await page.call(f"{domain}.enable")
            yield page

    def _stop(self) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        # Its renderer and helper processes share its process group (a session of its own).
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # a helper that outlived it
