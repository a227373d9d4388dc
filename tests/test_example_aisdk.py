"""The example AI SDK front end (examples/ai-sdk-chat: Vite, React, ``useChat({ resume: true
})`` with the stock DefaultChatTransport) in a real Chromium against a real relay.

The example is built once (``npm run build``: tsc and vite build) and served by ``vite
preview``, whose proxy sends /api to the test stack (a gunicorn web process, a Celery worker,
Redis) without changing the Host header, as docs/ai-sdk.md prescribes. Each test is one
guest (its own browser context) and one chat: it reloads, goes offline or stops mid-answer,
and then checks the page against what relay stored: the answer is shown exactly once, equal
to the stored text, and everything the page showed on the way was a prefix of it. `make
test` installs the packages (npm ci from the lock file) and Debian's chromium; without them
these tests fail, they never skip. Screenshots go to test-artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, expect

from ops.redis_server import free_port
from tests.conftest import ON_SQLITE, Stack
from tests.procs import ROOT, Proc
from tests.test_browser import ARTIFACTS

pytestmark = ON_SQLITE

EXAMPLE = ROOT / "examples" / "ai-sdk-chat"
T = 30_000  # ms: upper bounds for waits, never expectations
# About 1300 characters at 50 chunks/s: several seconds, long enough to act mid-answer.
PROMPT = "Explain write-ahead logs [demo:words=200] [demo:rate=50]"

# Every value the text of each assistant message had, per message id, in this page load.
SHOWN_LOG_SCRIPT = """
window.__shown = {};
const record = () => {
  for (const el of document.querySelectorAll('[data-role=message][data-message-role=assistant]')) {
    const text = el.querySelector('[data-role=message-text]').textContent;
    const log = (window.__shown[el.dataset.messageId] ||= []);
    if (log[log.length - 1] !== text) log.push(text);
  }
};
new MutationObserver(record).observe(document, {
  subtree: true, childList: true, characterData: true, attributes: true,
});
"""

ASSISTANT = "[data-role=message][data-message-role=assistant]"
USER = "[data-role=message][data-message-role=user]"


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def example_dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example, built once with its own build script (type check, then vite build), into
    a directory of this test process's own (pytest-xdist may run the tests in several)."""
    npm = shutil.which("npm")
    assert npm, "Node.js and npm are needed for the example's test"
    assert (EXAMPLE / "node_modules").is_dir(), (
        "run `npm ci --prefix examples/ai-sdk-chat` (make test does)"
    )
    dist = tmp_path_factory.mktemp("example-dist")
    result = subprocess.run(
        [npm, "run", "build", "--", "--outDir", str(dist), "--emptyOutDir"],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert (dist / "index.html").is_file()
    return dist


class Preview:
    """``vite preview`` of the built example on a free port, its proxy pointed at relay."""

    def __init__(self, dist: Path, relay_url: str, logdir: Path) -> None:
        self.dist = dist
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "RELAY_URL": relay_url}
        self.logdir = logdir
        self.proc: Proc | None = None

    def start(self) -> None:
        args = [
            str(EXAMPLE / "node_modules" / ".bin" / "vite"), "preview", str(EXAMPLE),
            "--outDir", str(self.dist),
            "--host", "127.0.0.1", "--port", str(self.port), "--strictPort",
        ]  # fmt: skip
        proc = self.proc = Proc("vite-preview", args, self.env, self.logdir)
        deadline = time.monotonic() + 60
        while True:
            assert proc.alive(), f"vite preview exited:\n{proc.output()}"
            try:
                if requests.get(f"{self.url}/", timeout=1).ok:
                    return
            except requests.RequestException:
                pass  # not listening yet
            assert time.monotonic() < deadline, f"vite preview did not start:\n{proc.output()}"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()  # SIGTERM by pid, SIGKILL if it lingers
            self.proc = None

    def restart(self) -> None:
        """Drop every connection through the proxy, as a network that goes away does."""
        self.stop()
        self.start()


@pytest.fixture(scope="module")
def preview(
    example_dist: Path, stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Preview]:
    server = Preview(example_dist, stack.base_url, tmp_path_factory.mktemp("vite"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Guest:
    """One browser context (one relay guest, by its session cookie) and its page."""

    def __init__(self, browser: Browser, base_url: str) -> None:
        self.base_url = base_url
        self.context: BrowserContext = browser.new_context(viewport={"width": 1000, "height": 800})
        self.context.add_init_script(SHOWN_LOG_SCRIPT)
        self.errors: list[str] = []
        self.page: Page = self.context.new_page()
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def open(self) -> str:
        """A new chat: the page puts a fresh id in the URL (?chat=<id>); returns it."""
        self.page.goto(f"{self.base_url}/")
        chat = self.page.locator("[data-role=chat]")
        expect(chat).to_be_visible(timeout=T)
        chat_id = chat.get_attribute("data-chat-id")
        assert chat_id and self.page.url.endswith(f"?chat={chat_id}")
        return chat_id

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def guest(browser: Browser, preview: Preview) -> Iterator[Guest]:
    g = Guest(browser, preview.url)
    yield g
    g.close()
    assert not g.errors, f"uncaught errors in the page: {g.errors}"


# -- helpers ---------------------------------------------------------------------------------


def send(page: Page, text: str) -> None:
    page.fill("[data-role=input]", text)
    page.press("[data-role=input]", "Enter")


def shown(page: Page) -> str:
    """The text of the (last) assistant message on the page."""
    return page.locator(f"{ASSISTANT} [data-role=message-text]").last.text_content() or ""


def wait_chars(page: Page, chars: int) -> None:
    page.wait_for_function(
        """([sel, n]) => { const a = [...document.querySelectorAll(sel)].pop();
                           return a && a.textContent.length >= n; }""",
        arg=[f"{ASSISTANT} [data-role=message-text]", chars],
        timeout=T,
    )


def wait_settled(page: Page, state: str = "done") -> None:
    """The chat is idle (status ready, online) and its last answer is ``state``."""
    chat = page.locator("[data-role=chat]")
    expect(chat).to_have_attribute("data-status", "ready", timeout=T)
    expect(chat).to_have_attribute("data-connection", "online", timeout=T)
    expect(page.locator(ASSISTANT).last).to_have_attribute("data-state", state, timeout=T)


def relay_answers(guest: Guest) -> list[dict[str, Any]]:
    """The guest's stored answers (content and status) through relay's own API: a fresh guest
    has exactly one chat, the example's."""
    page = guest.page
    chats = page.request.get(f"{guest.base_url}/api/v1/chats").json()["chats"]
    assert len(chats) == 1, chats
    chat = page.request.get(f"{guest.base_url}/api/v1/chats/{chats[0]['id']}").json()
    return [m for m in chat["messages"] if m["role"] == "assistant"]


def hydrated(guest: Guest, chat_id: str) -> list[dict[str, Any]]:
    resp = guest.page.request.get(f"{guest.base_url}/api/v1/ai-sdk/chat/{chat_id}/messages")
    assert resp.ok, resp.text()
    return resp.json()  # type: ignore[no-any-return]


def assert_shown_once(guest: Guest, answers: list[dict[str, Any]]) -> None:
    """The page shows each stored answer exactly once and in full, one message per stored
    message, and no text twice; everything it showed on the way was a prefix of the end."""
    page = guest.page
    texts = page.locator(f"{ASSISTANT} [data-role=message-text]").all_text_contents()
    assert texts == [a["content"] for a in answers]
    ids = page.locator(ASSISTANT).evaluate_all("els => els.map(e => e.dataset.messageId)")
    assert ids == [a["id"] for a in answers], "the page's message ids are relay's"
    assert page.locator(USER).count() == len(answers)
    body = str(page.evaluate("document.body.textContent"))
    for answer in answers:
        assert body.count(answer["content"]) == 1
        assert body.count(answer["content"][:60]) == 1, "the answer's opening shows twice"
    finals = {a["id"]: a["content"] for a in answers}
    log: dict[str, list[str]] = page.evaluate("window.__shown")
    for message_id, values in log.items():
        final = finals.get(message_id, "")
        for value in values:
            assert final.startswith(value), f"showed text that is not the answer's: {value!r}"


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"example-aisdk-{name}.png"), full_page=True)


def wait_until(check: Callable[[], bool], what: str, timeout_s: float = T / 1000) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def wait_ended(guest: Guest) -> list[dict[str, Any]]:
    """The guest's stored answers once relay has ended the last one."""
    answers: list[dict[str, Any]] = []

    def ended() -> bool:
        answers[:] = relay_answers(guest)
        return answers[-1]["status"] not in ("pending", "streaming")

    wait_until(ended, "relay to end the answer")
    return answers


def wait_shown(page: Page, answers: list[dict[str, Any]]) -> None:
    """The page settles on exactly the stored answers."""
    page.wait_for_function(
        """([sel, want]) => JSON.stringify([...document.querySelectorAll(sel)]
                                  .map(e => e.textContent)) === JSON.stringify(want)""",
        arg=[f"{ASSISTANT} [data-role=message-text]", [a["content"] for a in answers]],
        timeout=T,
    )
    wait_settled(page)


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_reload_mid_answer_resumes_it_once(guest: Guest) -> None:
    page = guest.page
    chat_id = guest.open()
    send(page, PROMPT)
    wait_chars(page, 80)
    before: dict[str, list[str]] = page.evaluate("window.__shown")

    page.reload()  # the same ?chat=<id>: hydrate, then useChat resumes the running answer
    expect(page.locator("[data-role=chat]")).to_have_attribute("data-chat-id", chat_id)
    expect(page.locator(ASSISTANT)).to_have_count(1, timeout=T)
    answers = wait_ended(guest)
    assert [a["status"] for a in answers] == ["complete"]
    wait_shown(page, answers)
    screenshot(page, "reload")

    assert_shown_once(guest, answers)
    for values in before.values():  # what the first page load showed, before the reload
        assert all(answers[0]["content"].startswith(v) for v in values)
    stored = hydrated(guest, chat_id)
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["parts"] == [{"type": "text", "text": answers[0]["content"], "state": "done"}]


@pytest.mark.timeout(120)
def test_offline_mid_answer_then_back_online_shows_it_once(
    guest: Guest, preview: Preview, stack: Stack
) -> None:
    page = guest.page
    chat_id = guest.open()
    send(page, PROMPT)
    wait_chars(page, 80)

    # Chromium's offline mode fails new requests but lets an open response run on, so the
    # connection is also dropped (the proxy restarts), as a network that goes away does.
    guest.context.set_offline(True)
    chat = page.locator("[data-role=chat]")
    expect(chat).to_have_attribute("data-connection", "offline", timeout=T)
    preview.restart()
    expect(chat).to_have_attribute("data-status", "error", timeout=T)  # a disconnect
    cut_at = len(shown(page))
    screenshot(page, "offline")

    # Generation does not depend on the page: the stored answer grows while it is offline.
    cookies = {c["name"]: c["value"] for c in guest.context.cookies()}
    api = f"{stack.base_url}/api/v1/ai-sdk/chat/{chat_id}/messages"

    def grew() -> bool:
        parts = requests.get(api, cookies=cookies, timeout=5).json()[-1]["parts"]
        return bool(parts) and (len(parts[0]["text"]) > cut_at or parts[0]["state"] == "done")

    wait_until(grew, "the answer to grow at relay while the page is offline")
    assert len(shown(page)) == cut_at, "nothing reached the page while it was offline"

    guest.context.set_offline(False)  # no reload: the page resumes by itself
    answers = wait_ended(guest)
    assert [a["status"] for a in answers] == ["complete"]
    wait_shown(page, answers)
    screenshot(page, "back-online")
    assert_shown_once(guest, answers)


@pytest.mark.timeout(120)
def test_stop_mid_answer_cancels_it_at_relay(guest: Guest) -> None:
    page = guest.page
    chat_id = guest.open()
    send(page, PROMPT)
    wait_chars(page, 80)
    # The answer grows under the pointer without moving the Stop button (a click aimed at
    # where it was must land on it: CI once missed it while a short answer pushed it down).
    stop = page.locator("[data-role=stop]")
    before = stop.bounding_box()
    wait_chars(page, 80 + len(shown(page)))
    assert stop.bounding_box() == before

    with page.expect_response(lambda r: r.url.endswith(f"/{chat_id}/stop")) as stopped:
        stop.click()
    assert stopped.value.status == 200
    assert stopped.value.json()["status"] == "cancelled"
    wait_settled(page, "stopped")
    screenshot(page, "stopped")

    answers = relay_answers(guest)
    assert [a["status"] for a in answers] == ["cancelled"]
    text = shown(page)
    assert answers[0]["content"].startswith(text), "the page shows more than relay kept"
    assert str(page.evaluate("document.body.textContent")).count(text[:60]) == 1

    # A reload (within the resume window it replays the stopped answer) shows it whole, once.
    page.reload()
    wait_shown(page, answers)
    assert relay_answers(guest) == answers, "the stopped answer no longer changes"
    assert_shown_once(guest, answers)

    # The chat is not busy any more: the next turn is accepted and answered.
    send(page, "And briefly? [demo:words=8]")
    expect(page.locator(ASSISTANT)).to_have_count(2, timeout=T)
    answers = wait_ended(guest)
    assert [a["status"] for a in answers] == ["cancelled", "complete"]
    wait_shown(page, answers)
    assert_shown_once(guest, answers)
    screenshot(page, "after-stop")
