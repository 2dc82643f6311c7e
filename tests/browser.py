"""A headless Chromium driven over the DevTools protocol, for tests of the HTML report. No network.

    from tests.browser import find_chromium, Browser
    with Browser(find_chromium(), tmp_path / "profile") as browser:
        page = browser.open(Path("report.html"))          # waits for the load event
        page.evaluate("document.title")                   # a JavaScript expression's value
        page.type_text("#search", "alpha")                # real input events, as typing does
        page.screenshot(tmp_path / "shot.png")
        page.errors(), page.requests()                    # console errors / exceptions, every URL requested

Chromium starts with ``--proxy-server=127.0.0.1:9`` and a host resolver that resolves nothing, so a
page that tried to reach the network would fail to; ``requests()`` lets the test assert it never tried.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Page:
    def __init__(self, browser: "Browser", session: str):
        self.browser, self.session = browser, session

    def send(self, method: str, **params) -> dict:
        return self.browser.send(method, params, self.session)

    def evaluate(self, expression: str):
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise AssertionError(f"{expression!r} raised: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def type_text(self, selector: str, text: str) -> None:
        """Focus the element and type ``text`` through the browser's input pipeline (input events fire)."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).focus()")
        self.send("Input.insertText", text=text)

    def clear(self, selector: str) -> None:
        """Select the field's text and delete it with a Backspace key press."""
        self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key="Backspace", code="Backspace",
                      windowsVirtualKeyCode=8, nativeVirtualKeyCode=8)

    def screenshot(self, path: Path, height: int = 1800) -> Path:
        width = self.evaluate("document.documentElement.clientWidth")
        full = self.evaluate("document.documentElement.scrollHeight")
        clip = {"x": 0, "y": 0, "width": width, "height": min(height, full), "scale": 1}
        data = self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def events(self, method: str) -> list[dict]:
        return [e["params"] for e in self.browser.events if e.get("method") == method and e.get("sessionId") == self.session]

    def errors(self) -> list[str]:
        out = [f"console.{p['type']}: {p.get('args')}" for p in self.events("Runtime.consoleAPICalled")
               if p["type"] in ("error", "assert")]
        out += [f"exception: {p['exceptionDetails']}" for p in self.events("Runtime.exceptionThrown")]
        out += [f"log {p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}"
                for p in self.events("Log.entryAdded") if p["entry"]["level"] == "error"]
        return out

    def requests(self) -> list[str]:
        return [p["request"]["url"] for p in self.events("Network.requestWillBeSent")]


class Browser:
    def __init__(self, executable: str, profile: Path, width: int = 1280, height: int = 900):
        self.executable, self.profile, self.size = executable, Path(profile), (width, height)
        self.events: list[dict] = []
        self._next = 0

    def __enter__(self) -> "Browser":
        import websocket

        self.profile.mkdir(parents=True, exist_ok=True)
        args = [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
                "--remote-debugging-port=0", "--remote-allow-origins=*", f"--user-data-dir={self.profile}",
                f"--window-size={self.size[0]},{self.size[1]}", "about:blank"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"})
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not (port_file.exists() and len(port_file.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.time() > deadline:
                self.close()
                raise RuntimeError(f"{self.executable} did not start its DevTools endpoint")
            time.sleep(0.05)
        port, path = port_file.read_text().split()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise AssertionError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, session: str, since: int = 0, timeout: float = 60) -> dict:
        """The first ``method`` event of ``session`` from ``self.events[since]`` on, waiting for it."""
        for e in self.events[since:]:
            if e.get("method") == method and e.get("sessionId") == session:
                return e["params"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            event = json.loads(self.ws.recv())
            self.events.append(event)
            if event.get("method") == method and event.get("sessionId") == session:
                return event["params"]
        raise AssertionError(f"no {method} within {timeout} s")

    def open(self, path: Path) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        for domain in ("Runtime", "Log", "Network", "Page"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                  deviceScaleFactor=1, mobile=False)
        mark = len(self.events)
        page.send("Page.navigate", url=Path(path).resolve().as_uri())
        self.wait_for("Page.loadEventFired", session, since=mark)
        return page
