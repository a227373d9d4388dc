"""Debian's Chromium for the browser tests, driven by Playwright with ``executable_path``
(never a downloaded browser; ``make test`` installs the package). The ``browser`` fixture in
tests/conftest.py launches it once per test module; a ``Session`` is one browser context (one
guest user) in it, and the ``session``, ``phone`` and ``page`` fixtures there are made of them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress

from playwright.sync_api import Browser, BrowserContext, Page, ViewportSize, sync_playwright
from playwright.sync_api import Error as PlaywrightError

CHROMIUM = "/usr/bin/chromium"
DESKTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def launched() -> Iterator[Browser]:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


# Records every value of data-raw an assistant message ever had, per message id.
RAW_LOG_SCRIPT = """
window.__rawLog = {};
new MutationObserver((mutations) => {
  for (const m of mutations) {
    const nodes = m.type === "attributes" ? [m.target] : [...m.addedNodes];
    for (const el of nodes) {
      if (el.nodeType !== 1 || !el.matches(".msg.assistant[data-raw]")) continue;
      (window.__rawLog[el.dataset.id] ||= []).push(el.dataset.raw);
    }
  }
}).observe(document, {
  subtree: true, childList: true, attributes: true, attributeFilter: ["data-raw"],
});
"""


class Session:
    """One browser context (one guest user) with its page errors collected."""

    def __init__(self, browser: Browser, viewport: ViewportSize) -> None:
        self.context: BrowserContext = browser.new_context(viewport=viewport)
        self.context.add_init_script(RAW_LOG_SCRIPT)
        self.errors: list[str] = []

    def new_page(self) -> Page:
        page = self.context.new_page()
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        return page

    def close(self) -> None:
        self.context.close()


def new_session(browser: Browser, viewport: ViewportSize) -> Iterator[Session]:
    """A session for one test: closed after it, which fails on any uncaught page error."""
    s = Session(browser, viewport)
    yield s
    s.close()
    assert not s.errors, f"uncaught errors in the page: {s.errors}"


def kill_tab(page: Page) -> None:
    """End a tab the way a killed browser process does: its renderer dies and runs no more
    script. A test that needs a tab gone while the context is offline uses this rather than
    page.close() or leaving for another page: Playwright lifts the offline emulation from the
    document it lets go of, and that document, briefly online, can still send requests from
    its "online" handler (Chromium's net log shows them reach the server)."""
    with page.expect_event("crash", timeout=10_000), suppress(PlaywrightError):
        page.goto("chrome://crash", timeout=10_000)  # the navigation aborts; the tab crashes
    page.close()


# For page scripts that drive relay-stream.js by hand: a WebSocket stand-in the script opens,
# feeds and drops itself (``sockets``: every one made), and two waiting helpers.
FAKE_SOCKET_JS = """
  const sockets = [];
  class FakeSocket {
    constructor(url) { this.url = url; this.readyState = 0; sockets.push(this); }
    send() {}
    close() { this.readyState = 3; }
    open() { this.readyState = 1; this.onopen?.({}); }
    emit(event) { this.onmessage?.({ data: JSON.stringify(event) }); }
    drop(code) { this.readyState = 3; this.onclose?.({ code, reason: '' }); }
  }
  const until = async (probe) => {
    for (let i = 0; i < 500 && !probe(); i += 1) await new Promise((r) => setTimeout(r, 10));
  };
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
"""
