"""The chat page and the user's live feed (issue 14, the page side), in a real Chromium
against the real stack: two devices of one user (two browser contexts sharing the guest
cookie) follow each other's chats and answers through the feed with the list poll turned
off; completion notifications from a hidden tab (the browser's Notification constructor is
wrapped to observe it, and the tab's visibility is emulated); the "Waiting for the model…"
state of a quiet answer. Screenshots of the notification bell go to
test-artifacts/feed-*.png, axe-core's findings to test-artifacts/feed-axe-<theme>.json.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.chromium import DESKTOP, FAKE_SOCKET_JS, PHONE, Session
from tests.conftest import ON_SQLITE, Stack
from tests.test_browser import (
    ARTIFACTS,
    T,
    answer,
    assert_exact,
    open_app,
    send,
    shot,
    stream_id,
    wait_status,
    wait_text,
)
from tests.test_page_render import audit, set_theme

pytestmark = ON_SQLITE

# The page's test hooks (see app.js): no list poll at all, so whatever reaches a page came
# through the feed; every feed event the page applied is kept in relayTest.feedLog.
NO_POLL = "window.relayTest = { pollMs: 0, feedLog: [] };"

# A tab the test can hide and show (headless Chromium keeps every page visible), and every
# call of the browser's Notification constructor recorded (the real one still runs).
HIDDEN_AND_NOTIFICATIONS = """
window.__hide = false;
Object.defineProperty(Document.prototype, 'hidden', {
  configurable: true, get() { return window.__hide; } });
Object.defineProperty(Document.prototype, 'visibilityState', {
  configurable: true, get() { return window.__hide ? 'hidden' : 'visible'; } });
window.__notes = [];
window.__noteObjects = [];
if (window.Notification) {
  const Real = window.Notification;
  window.Notification = class extends Real {
    constructor(title, options = {}) {
      super(title, options);
      window.__notes.push({ title, body: options.body ?? null, tag: options.tag ?? null });
      window.__noteObjects.push(this);
    }
  };
}
"""

# Every state of the last answer, each time its data-raw or data-waiting changed:
# [waiting, status text, length of the text so far, the top bar's connection state].
WAITING_LOG = """
window.__waitLog = [];
new MutationObserver(() => {
  const a = [...document.querySelectorAll('.msg.assistant')].pop();
  if (!a) return;
  const conn = document.getElementById('conn').dataset.state;
  window.__waitLog.push([a.dataset.waiting === 'true', a.querySelector('.status').textContent,
                         (a.dataset.raw || '').length, conn]);
}).observe(document, { subtree: true, attributes: true,
                       attributeFilter: ['data-raw', 'data-waiting'] });
"""


def close_all(*sessions: Session) -> None:
    errors = [e for s in sessions for e in s.errors]
    for s in sessions:
        s.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture
def devices(browser: Browser) -> Iterator[tuple[Session, Session]]:
    """Two browser contexts (two devices); same_user() gives the second the first's cookie."""
    first, second = Session(browser, DESKTOP), Session(browser, DESKTOP)
    for s in (first, second):
        s.context.add_init_script(NO_POLL)
    yield first, second
    close_all(first, second)


def same_user(first: Session, second: Session, base_url: str) -> tuple[Page, Page]:
    """Open the page in the first device (it gets a guest cookie), copy the cookie to the
    second and open it there: one user on two devices, both following the feed."""
    one = first.new_page()
    open_app(one, base_url)
    second.context.add_cookies(first.context.cookies())  # type: ignore[arg-type]
    two = second.new_page()
    open_app(two, base_url)
    for page in (one, two):
        expect(page.locator("html")).to_have_attribute("data-feed", "live", timeout=T)
    assert one.evaluate("window.relayTest.pollMs") == 0  # the poll cannot have done it
    return one, two


def item(page: Page, chat_id: str) -> Any:
    return page.locator(f"#chat-list li[data-chat-id='{chat_id}']")


def chat_title(page: Page, base_url: str, chat_id: str) -> str:
    resp = page.request.get(f"{base_url}/api/v1/chats/{chat_id}")
    assert resp.ok, resp.text()
    return str(resp.json()["title"])


def wait_feed(page: Page, kind: str, sid: str) -> None:
    """Wait until the page has applied the feed event `kind` of stream `sid`."""
    page.wait_for_function(
        """([kind, sid]) => window.relayTest.feedLog.some(
             (e) => e.type === kind && e.streamId === sid)""",
        arg=[kind, sid],
        timeout=T,
    )


def notes(page: Page) -> list[dict[str, Any]]:
    return page.evaluate("window.__notes")  # type: ignore[no-any-return]


def hide(page: Page, hidden: bool) -> None:
    page.evaluate(
        "(h) => { window.__hide = h; document.dispatchEvent(new Event('visibilitychange')); }",
        hidden,
    )


# -- 1. two devices follow each other -------------------------------------------------------


def test_two_devices_follow_chats_and_answers_through_the_feed(
    devices: tuple[Session, Session], stack: Stack
) -> None:
    """With the list poll off: a chat created on one device appears in the other's list; a
    message sent on one appears on the other, whose answer streams there too (no reload);
    both ways; a rename shows in the other's list and top bar; a delete takes the other out
    of the chat, back to the empty state."""
    base = stack.base_url
    laptop, phone = same_user(*devices, base)
    phone.evaluate("window.__sameDocument = true")  # gone if the page were reloaded

    chat_id = send(laptop, "Hello from the laptop [demo:words=12]")
    wait_status(laptop, "done")
    expect(item(phone, chat_id)).to_have_count(1, timeout=T)  # chat.created
    phone.click(f"#chat-list a[data-chat-id='{chat_id}']")
    expect(phone.locator(".msg.assistant")).to_have_count(1, timeout=T)
    wait_status(phone, "done")

    # A message sent on the laptop appears on the phone and streams there.
    send(laptop, "A second question about durable queues [demo:words=150] [demo:rate=40]")
    expect(phone.locator(".msg.user")).to_have_count(2, timeout=T)
    expect(phone.locator(".msg.assistant")).to_have_count(2, timeout=T)
    expect(laptop.locator(".msg.assistant")).to_have_count(2, timeout=T)
    wait_status(phone, "done")
    wait_status(laptop, "done")
    shown = assert_exact(phone, base, chat_id)
    assert assert_exact(laptop, base, chat_id) == shown
    history = phone.evaluate("(id) => window.__rawLog[id]", answer(phone).get_attribute("data-id"))
    assert len(history) > 1 and history[0] != shown, "the answer did not stream on the phone"

    # And the other way round.
    send(phone, "Now one from the phone [demo:words=60] [demo:rate=40]")
    expect(laptop.locator(".msg.assistant")).to_have_count(3, timeout=T)
    expect(phone.locator(".msg.assistant")).to_have_count(3, timeout=T)
    wait_status(laptop, "done")
    wait_status(phone, "done")
    assert assert_exact(laptop, base, chat_id) == assert_exact(phone, base, chat_id)

    # A rename on the laptop: the phone's list and top bar follow.
    item(laptop, chat_id).locator(".chat-rename").click()
    field = item(laptop, chat_id).locator(".chat-rename-input")
    field.fill("Renamed on the laptop")
    field.press("Enter")
    expect(item(phone, chat_id).locator(".chat-link-title")).to_have_text(
        "Renamed on the laptop", timeout=T
    )
    expect(phone.locator("#chat-title")).to_have_text("Renamed on the laptop", timeout=T)

    # A second chat created on the phone shows on the laptop.
    phone.click("#new-chat")
    other = send(phone, "Another chat from the phone [demo:words=8]")
    wait_status(phone, "done")
    expect(item(laptop, other)).to_have_count(1, timeout=T)
    phone.click(f"#chat-list a[data-chat-id='{chat_id}']")
    expect(phone.locator(".msg.assistant")).to_have_count(3, timeout=T)

    # A delete on the laptop: the phone leaves the chat for the empty state.
    laptop.once("dialog", lambda dialog: dialog.accept())
    item(laptop, chat_id).locator(".chat-delete").click()
    expect(item(phone, chat_id)).to_have_count(0, timeout=T)
    expect(phone.locator("#empty")).to_be_visible(timeout=T)
    expect(phone.locator("#messages .msg")).to_have_count(0)
    assert phone.evaluate("location.hash") == ""
    expect(phone.locator("#notice-text")).to_contain_text("deleted in another tab")
    expect(item(phone, other)).to_have_count(1)
    # The laptop deleted it itself: no notice about another device there.
    expect(laptop.locator("#notice-text")).not_to_contain_text("deleted in another tab")
    assert phone.evaluate("window.__sameDocument") is True
    types = {e["type"] for e in phone.evaluate("window.relayTest.feedLog")}
    assert {"reset", "chat.created", "chat.renamed", "chat.deleted"} <= types
    assert {"answer.queued", "answer.started", "answer.finished"} <= types


# -- 2. completion notifications ------------------------------------------------------------


def test_a_hidden_tab_notifies_when_an_answer_finishes(browser: Browser, stack: Stack) -> None:
    """The bell is off by default and nothing is shown; on (permission granted), a hidden
    tab shows one notification per finished answer with the chat's title, "Answer ready" or
    "Answer stopped", tagged with the stream; none while the tab is visible or the bell off.
    Clicking the notification opens the chat."""
    base = stack.base_url
    watcher, poster = Session(browser, DESKTOP), Session(browser, DESKTOP)
    try:
        watcher.context.add_init_script(NO_POLL + HIDDEN_AND_NOTIFICATIONS)
        poster.context.add_init_script(NO_POLL)
        watcher.context.grant_permissions(["notifications"], origin=base)
        tab, other = same_user(watcher, poster, base)
        bell = tab.locator("#notify")
        expect(bell).to_be_visible()
        expect(bell).to_have_attribute("aria-pressed", "false")
        expect(bell).to_have_accessible_name("Notify me when an answer finishes")

        def post(text: str, *, new: bool = False, stop: bool = False) -> tuple[str, str]:
            if new:
                other.click("#new-chat")
                expect(other.locator(".msg")).to_have_count(0)
            answers = other.locator(".msg.assistant").count()
            chat_id = send(other, text)
            # send() returns at once in an open chat: wait for this answer, not the last one.
            expect(other.locator(".msg.assistant")).to_have_count(answers + 1, timeout=T)
            if stop:
                wait_text(other, 20)
                other.click("#stop")
                wait_status(other, "cancelled")
            else:
                wait_status(other, "done")
            sid = stream_id(other)
            wait_feed(tab, "answer.finished", sid)
            return chat_id, sid

        # Off by default: a hidden tab shows nothing.
        hide(tab, True)
        post("Quiet while the bell is off [demo:words=8]", new=True)
        assert notes(tab) == []

        # On: the permission is already granted, so no question; kept in localStorage.
        hide(tab, False)
        bell.click()
        expect(bell).to_have_attribute("aria-pressed", "true")
        assert tab.evaluate("localStorage.getItem('relay.notify')") == "on"
        post("Visible tabs are not notified [demo:words=8]")
        assert notes(tab) == []

        # Hidden and on: one notification, with the chat's title.
        hide(tab, True)
        chat_id, sid = post("Tell me when this one is ready [demo:words=8]", new=True)
        title = chat_title(other, base, chat_id)
        tab.wait_for_function("window.__notes.length >= 1", timeout=T)
        assert notes(tab) == [{"title": title, "body": "Answer ready", "tag": sid}]

        # A stopped answer says so.
        _, stopped = post("A long one to stop [demo:words=400] [demo:rate=20]", stop=True)
        tab.wait_for_function("window.__notes.length >= 2", timeout=T)
        assert notes(tab)[1] == {"title": title, "body": "Answer stopped", "tag": stopped}

        # Clicking the first one opens its chat.
        assert tab.evaluate("location.hash") == ""
        tab.evaluate("window.__noteObjects[0].dispatchEvent(new Event('click'))")
        tab.wait_for_function("(id) => location.hash === '#' + id", arg=chat_id, timeout=T)
        expect(tab.locator("#chat-title")).to_have_text(title, timeout=T)
        expect(tab.locator(".msg.assistant")).to_have_count(2, timeout=T)

        # Off again: hidden or not, nothing more.
        hide(tab, False)
        bell.click()
        expect(bell).to_have_attribute("aria-pressed", "false")
        hide(tab, True)
        post("Quiet again [demo:words=8]", new=True)
        assert len(notes(tab)) == 2
    finally:
        close_all(watcher, poster)


def test_the_bell_asks_for_permission_only_when_turned_on(browser: Browser, stack: Stack) -> None:
    """Loading the page never asks; turning the bell on does, and a refusal leaves it off
    with a sentence saying why."""
    s = Session(browser, DESKTOP)
    try:
        s.context.add_init_script(
            NO_POLL
            + """
            window.__asked = 0;
            if (window.Notification) {
              Object.defineProperty(Notification, 'permission', {
                configurable: true, get: () => window.__answer ?? 'default' });
              Notification.requestPermission = async () => {
                window.__asked += 1; window.__answer = 'denied'; return 'denied'; };
            }"""
        )
        page = s.new_page()
        open_app(page, stack.base_url)
        assert page.evaluate("window.__asked") == 0
        page.click("#notify")
        expect(page.locator("#notice-text")).to_contain_text("Notifications are blocked")
        assert page.evaluate("window.__asked") == 1
        expect(page.locator("#notify")).to_have_attribute("aria-pressed", "false")
        assert page.evaluate("localStorage.getItem('relay.notify')") is None
    finally:
        close_all(s)


# -- 3. a quiet answer: "Waiting for the model…" -------------------------------------------


def test_a_quiet_answer_shows_waiting_for_the_model(browser: Browser, stack: Stack) -> None:
    """An answer written one piece a second, with the page's quiet limit set to 400 ms: the
    answer says "Waiting for the model…" between pieces while the connection stays Live (not
    "Reconnecting…"), and goes back to Streaming with the next piece; it ends Done, equal to
    the stored message."""
    s = Session(browser, DESKTOP)
    try:
        s.context.add_init_script("window.relayTest = { quietMs: 400 };" + WAITING_LOG)
        page = s.new_page()
        open_app(page, stack.base_url)
        chat_id = send(page, "One two three four five [demo:echo] [demo:rate=1]")
        wait_status(page, "streaming")
        expect(answer(page)).to_have_attribute("data-waiting", "true", timeout=T)
        expect(answer(page).locator(".status")).to_have_text("Waiting for the model\u2026")
        expect(page.locator("#conn")).to_have_attribute("data-state", "live")
        wait_status(page, "done")
        assert_exact(page, stack.base_url, chat_id)
        expect(answer(page)).not_to_have_attribute("data-waiting", "true")
        expect(answer(page).locator(".status")).to_have_text("Done")
        log = page.evaluate("window.__waitLog")
        waits = [i for i, (waiting, *_rest) in enumerate(log) if waiting]
        assert waits, log
        for i in waits:
            _, text, _length, conn = log[i]
            assert text == "Waiting for the model\u2026" and conn == "live"
        # After a wait with some text, the next piece brings Streaming back, with more text.
        first = next(i for i in waits if log[i][2] > 0)
        assert any(
            not waiting and text == "Streaming" and length > log[first][2]
            for waiting, text, length, _conn in log[first + 1 :]
        ), log
    finally:
        close_all(s)


QUIET_SCRIPT = (
    """async () => {
  const { attach, STATES } = await import('/static/relay-stream.js');
"""
    + FAKE_SOCKET_JS
    + """  const out = { states: [], seen: [] };
  const h = attach('q1', {
    WebSocket: FakeSocket, stallMs: 1e9, quietMs: 50,
    onState: (st) => out.states.push(st),
    onEvent: (e) => out.seen.push([e.seq, h.state]),
  });
  sockets[0].open();
  await until(() => h.state === STATES.STALLED);
  sockets[0].emit({ type: 'ping' });  // not an event: still stalled
  out.afterPing = h.state;
  sockets[0].emit({ type: 'chunks', seq: 1, texts: ['a', 'b'] });
  out.afterChunk = h.state;
  await until(() => h.state === STATES.STALLED);
  sockets[0].emit({ type: 'done', seq: 3 });
  await sleep(150);
  out.afterTerminal = h.state;  // nothing more is expected: not stalled
  sockets[0].drop(1000);
  await h.done;
  const quiet = attach('q2', { WebSocket: FakeSocket, stallMs: 1e9, quietMs: 0 });
  sockets[1].open();
  await sleep(150);
  out.never = quiet.state;
  quiet.close();
  out.stalled = STATES.STALLED;
  return out;
}"""
)


def test_relay_stream_reports_a_quiet_stream_as_stalled(page: Page, stack: Stack) -> None:
    """relay-stream.js with a hand-driven socket: quietMs without an event -> "stalled",
    the next event -> "live" (before it is delivered); never after the terminal event, never
    with quietMs 0."""
    open_app(page, stack.base_url)
    out = page.evaluate(QUIET_SCRIPT)
    assert out["stalled"] == "stalled"
    assert out["states"] == ["connecting", "live", "stalled", "live", "stalled", "live", "ended"]
    assert out["afterPing"] == "stalled"
    assert out["afterChunk"] == "live"
    assert out["seen"] == [[1, "live"], [2, "live"], [3, "live"]]
    assert out["afterTerminal"] == "live"
    assert out["never"] == "live"


# -- 4. the bell: screenshots and axe -------------------------------------------------------


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_bell_screenshots_and_axe(browser: Browser, stack: Stack, theme: str) -> None:
    """The bell off and on, desktop and phone, in both themes (test-artifacts/feed-*.png);
    axe-core on the page with the bell off and on: no serious or critical violation."""
    findings: dict[str, list[Any]] = {}
    incomplete: dict[str, list[Any]] = {}
    s = Session(browser, DESKTOP)
    try:
        s.context.add_init_script(NO_POLL)
        s.context.grant_permissions(["notifications"], origin=stack.base_url)
        page = s.new_page()
        page.emulate_media(reduced_motion="reduce")
        open_app(page, stack.base_url)
        set_theme(page, theme)
        send(page, "A chat to show the bell [demo:words=20]")
        wait_status(page, "done")
        bell = page.locator("#notify")
        audit(page, "bell-off", findings, incomplete)
        shot(page, f"feed-desktop-{theme}-bell-off")
        bell.click()
        expect(bell).to_have_attribute("aria-pressed", "true")
        bell.focus()
        audit(page, "bell-on", findings, incomplete)
        shot(page, f"feed-desktop-{theme}-bell-on")
        page.set_viewport_size(PHONE)
        expect(bell).to_be_visible()
        box = bell.bounding_box()
        assert box and box["x"] + box["width"] <= PHONE["width"]
        shot(page, f"feed-phone-{theme}-bell-on")
        page.click("#open-sidebar")  # the chat list's links, for axe's link rules
        page.wait_for_function(
            "document.getElementById('sidebar').getBoundingClientRect().left >= 0"
        )
        audit(page, "phone-chat-list-bell-on", findings, incomplete)
        page.click("#close-sidebar")
        page.wait_for_function(
            "document.getElementById('sidebar').getBoundingClientRect().right <= 0"
        )
        bell.click()
        expect(bell).to_have_attribute("aria-pressed", "false")
        shot(page, f"feed-phone-{theme}-bell-off")
    finally:
        close_all(s)
    ARTIFACTS.mkdir(exist_ok=True)
    report = {"violations": findings, "incomplete": incomplete}
    (ARTIFACTS / f"feed-axe-{theme}.json").write_text(json.dumps(report, indent=2))
    serious = {
        state: [v for v in found if v["impact"] in ("serious", "critical")]
        for state, found in findings.items()
    }
    assert not any(serious.values()), json.dumps(serious, indent=2)


@pytest.mark.stack_env(RELAY_QUEUE_POSITION_AFTER_S="0.5")
def test_a_queued_answer_shows_its_place_in_line(browser: Browser, isolated_stack: Stack) -> None:
    """One worker that runs one answer at a time, busy with a long answer posted from
    another device of the same user: the page's answer says where it waits (from the feed's
    answer.waiting), then streams and ends equal to the stored message."""
    isolated_stack.start_worker("one-at-a-time", concurrency=1)
    s = Session(browser, DESKTOP)
    try:
        page = s.new_page()
        open_app(page, isolated_stack.base_url)
        other = isolated_stack.client()
        for cookie in s.context.cookies():
            other.http.cookies.set(cookie["name"], cookie["value"])
        busy = other.post_chat("Long one elsewhere [demo:words=200] [demo:rate=40]")
        chat_id = send(page, "Mine waits [demo:words=20]")
        status = answer(page).locator(".status")
        # One answer started in the last minute: next, in about a minute.
        expect(status).to_have_text(re.compile(r"^Queued: next in line, about 1 min$"), timeout=T)
        wait_status(page, "done")
        assert_exact(page, isolated_stack.base_url, chat_id)
        assert other.stream(busy["streamId"])["status"] == "done"
    finally:
        close_all(s)
