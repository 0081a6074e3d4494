"""A headless Chromium driven over the DevTools protocol (a websocket, `websocket-client`): enough to open a page,
wait for something in it, read values out of it and take a screenshot. The playwright browser download is not
reachable from CI, and the system's Chromium (Debian's `chromium`) speaks this protocol itself."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

INSTALL_HINT = ("headless Chromium is needed for the MLflow UI test: `apt-get install chromium` as root "
                "(scripts/setup.sh does it where apt is usable), or set FORGETRAY_CHROMIUM to a Chromium/Chrome binary")


def chromium_path() -> str | None:
    found = os.environ.get("FORGETRAY_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return found


class Browser:
    """One headless Chromium with one page. `with Browser() as b: b.open(url); b.wait_for(js); b.eval(js)`."""

    def __init__(self, width: int = 1500, height: int = 950, binary: str | None = None):
        self.binary, self.size = binary or chromium_path(), (width, height)
        self.profile = tempfile.mkdtemp(prefix="forgetray-chromium-")
        self.process = None
        self.ws = None
        self.next_id = 0

    def __enter__(self) -> "Browser":
        import websocket

        # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start
        self.process = subprocess.Popen(
            [self.binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"  # Chromium writes its port here once it listens
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.binary} did not start (exit code {self.process.poll()})")
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
                pages = [t for t in json.load(answer) if t["type"] == "page"]
            if pages or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.ws is not None:
            self.ws.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method: str, **params):
        """One protocol command; its result (events that arrive meanwhile are dropped)."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able; promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, timeout_s: float = 90, what: str = ""):
        """Until `expression` is truthy in the page; its value. TimeoutError saying `what` (or the expression)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
            except RuntimeError:  # the page is between documents
                value = None
            if value:
                return value
            time.sleep(0.5)
        raise TimeoutError(f"not in the page after {timeout_s:.0f} s: {what or expression}")

    def screenshot(self, path: Path, clip: dict | None = None) -> Path:
        """A PNG of the page, or of `clip` ({x, y, width, height} in CSS pixels)."""
        data = self.call("Page.captureScreenshot", format="png",
                         **({"clip": {**clip, "scale": 1}} if clip else {}))["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)
