"""The page at `/` in a real headless browser: Debian's chromium, driven over the DevTools protocol.

The protocol runs over --remote-debugging-pipe (JSON messages ended by NUL on fds 3 and 4), so no websocket
client and no debugging port are needed. The text is typed (Input.insertText) and the button clicked with real
mouse events; what the page shows must be `Classifier.predict`'s answer."""
from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import runner
from dist_finetune import Classifier

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-proxy-server",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--remote-debugging-pipe")
READ_PAGE = """JSON.stringify({
  label: document.getElementById("label").textContent,
  outWidth: document.getElementById("out").getBoundingClientRect().width,
  rows: [...document.querySelectorAll("#out > div")].map(row => ({
    name: row.querySelector(".name").textContent,
    value: row.querySelector(".value").textContent,
    width: row.querySelector(".bar").getBoundingClientRect().width}))})"""
LABEL_FILLED = """new Promise((resolve, reject) => {
  const deadline = Date.now() + 20000;
  (function poll() {
    if (document.getElementById("label").textContent) resolve(true);
    else if (Date.now() > deadline) reject(new Error("#label still empty after 20 s"));
    else setTimeout(poll, 20);
  })();
})"""


class Browser:
    """One chromium process and its DevTools pipe; `call` sends a command and returns its result."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, log: Path) -> None:
        self.proc, self.to_browser, self.from_browser, self.log = proc, to_browser, from_browser, log
        self.buffer, self.next_id = b"", 0

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 20) -> dict[str, Any]:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self.receive(deadline, method)
            if reply.get("id") == self.next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                return reply["result"]

    def receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_browser], [], [], left)[0]:
                raise AssertionError(f"chromium did not answer {waiting_for} in time\n{self.log_tail()}")
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise AssertionError(f"chromium closed its DevTools pipe\n{self.log_tail()}")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def high_fd(fd: int) -> int:
    """A copy of `fd` numbered 10 or more, so the redirections to fds 3 and 4 cannot clobber it."""
    copy = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return copy


def launch_chromium(chromium: str, tmp: Path) -> Browser:
    to_read, to_write = map(high_fd, os.pipe())
    from_read, from_write = map(high_fd, os.pipe())
    log = tmp / "chromium.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_read} 4>&{from_write} {to_read}<&- {from_write}>&-', chromium,
             *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, pass_fds=(to_read, from_write),
            start_new_session=True)
    os.close(to_read)
    os.close(from_write)
    return Browser(proc, to_write, from_read, log)


def stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return runner.tiny_export(tmp_path_factory.mktemp("page") / "export")


@pytest.fixture(scope="module")
def server(export, tmp_path_factory) -> Iterator[str]:
    port = runner.free_port()
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dist_finetune.serve", "--model", str(export), "--port",
                                 str(port)], cwd=runner.REPO, env=runner.child_env(), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=out, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        yield url
    finally:
        stop_group(proc)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not become ready in {timeout} s\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium: install Debian's chromium (apt-get install chromium) to test the page at /")
    b = launch_chromium(chromium, tmp_path_factory.mktemp("chromium"))
    try:
        yield b
    finally:
        stop_group(b.proc)
        os.close(b.to_browser)
        os.close(b.from_browser)


@pytest.fixture
def tab(browser: Browser) -> Iterator[str]:
    target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
    yield session
    browser.call("Target.closeTarget", {"targetId": target})


def evaluate(browser: Browser, session: str, expression: str) -> Any:
    reply = browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                              "awaitPromise": True}, session)
    assert "exceptionDetails" not in reply, reply["exceptionDetails"]
    return reply["result"].get("value")


def submit(browser: Browser, session: str, url: str, text: str) -> dict[str, Any]:
    """Open the page, type `text`, click the button, and read what the page shows once #label is filled."""
    navigated = browser.call("Page.navigate", {"url": f"{url}/"}, session)
    assert "errorText" not in navigated, navigated
    evaluate(browser, session, 'new Promise(r => document.readyState === "complete" ? r() : onload = r)')
    evaluate(browser, session, 'document.getElementById("text").focus()')
    if text:
        browser.call("Input.insertText", {"text": text}, session)
    assert evaluate(browser, session, 'document.getElementById("text").value') == text
    click(browser, session, "#go")
    evaluate(browser, session, LABEL_FILLED)
    return json.loads(evaluate(browser, session, READ_PAGE))


def click(browser: Browser, session: str, selector: str) -> None:
    box = evaluate(browser, session, f"(b => ({{x: b.x + b.width / 2, y: b.y + b.height / 2}}))"
                                     f"(document.querySelector({json.dumps(selector)}).getBoundingClientRect())")
    for kind in ("mousePressed", "mouseReleased"):
        browser.call("Input.dispatchMouseEvent", {"type": kind, "x": box["x"], "y": box["y"], "button": "left",
                                                  "clickCount": 1}, session)


@pytest.mark.parametrize("text", ["WINNER! Claim your prize now, txt WIN to 80086", "Où est la gare? 日本語 ✓"])
def test_the_page_shows_predicts_label_and_probabilities_as_bars(browser, tab, server, export, text):
    mine = Classifier.load(export, device="cpu").predict([text])[0]
    shown = submit(browser, tab, server, text)
    assert shown["label"] == mine.label
    assert [row["name"] for row in shown["rows"]] == ["ham", "spam"]
    for row in shown["rows"]:
        probability = mine.probabilities[row["name"]]
        assert row["value"] == f"{probability:.4f}"
        assert row["width"] == pytest.approx(probability * shown["outWidth"], abs=0.002 * shown["outWidth"] + 1)
    ham, spam = (row["width"] for row in shown["rows"])
    assert (ham > spam) == (mine.probabilities["ham"] > mine.probabilities["spam"])


def test_an_empty_text_shows_the_servers_error(browser, tab, server):
    error = httpx.post(f"{server}/v1/classify", json={"text": ""}, timeout=30)
    assert 400 <= error.status_code < 500
    shown = submit(browser, tab, server, "")
    assert shown["label"] == f"error: {error.json()['error']['message']}"
    assert shown["rows"] == []
