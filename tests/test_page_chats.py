"""The chat page's chat actions (issue 13, the rest), in a real Chromium against the real
stack: rename a chat in the sidebar, search chats by title, regenerate the last answer (the
old one is replaced), the model picker, and a code block's Copy button that survives the
block being streamed. Every answer checked is compared with the stored message. Screenshots
go to test-artifacts/chats-*.png (desktop and phone, light and dark), axe-core's findings to
test-artifacts/chats-axe-<theme>.json.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, Request, expect

from tests.chromium import DESKTOP, PHONE, Session, new_session
from tests.conftest import ON_SQLITE, Stack
from tests.test_browser import (
    ARTIFACTS,
    T_ANSWER,
    T,
    answer,
    assert_exact,
    open_app,
    send,
    shot,
    stored_answer,
    stream_id,
    wait_status,
    wait_text,
)
from tests.test_page_render import audit, set_theme

pytestmark = ON_SQLITE


@pytest.fixture(scope="module")
def many_models(stack: Stack) -> str:
    """A second web process of the stack that allows three models; its base URL."""
    _proc, port = stack.start_web_with(RELAY_ALLOWED_MODELS="demo-large,demo-small")
    return f"http://127.0.0.1:{port}"


def item(page: Page, chat_id: str) -> Any:
    return page.locator(f"#chat-list li[data-chat-id='{chat_id}']")


def titles(page: Page) -> list[str]:
    return listed(page).all_inner_texts()


def listed(page: Page) -> Any:
    return page.locator("#chat-list .chat-link-title")


def new_chat(page: Page, text: str) -> str:
    page.click("#new-chat")
    chat_id = send(page, text)
    wait_status(page, "done")
    expect(item(page, chat_id)).to_have_count(1, timeout=T)
    return chat_id


def api_chat(page: Page, base_url: str, chat_id: str) -> dict[str, Any]:
    resp = page.request.get(f"{base_url}/api/v1/chats/{chat_id}")
    assert resp.ok, resp.text()
    return resp.json()  # type: ignore[no-any-return]


# -- 1. rename -------------------------------------------------------------------------------


def test_rename_a_chat_in_the_sidebar_with_the_keyboard(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    other = new_chat(page, "Another chat [demo:words=5]")
    chat_id = new_chat(page, "Tell me about queues [demo:words=5]")
    old = api_chat(page, stack.base_url, chat_id)["title"]
    rename = item(page, chat_id).locator(".chat-rename")
    expect(rename).to_have_accessible_name(f"Rename chat: {old}")
    # Reachable with Tab: right after the chat's link, before its Delete button.
    item(page, chat_id).locator(".chat-link").focus()
    page.keyboard.press("Tab")
    expect(rename).to_be_focused()
    page.keyboard.press("Enter")
    field = item(page, chat_id).locator(".chat-rename-input")
    expect(field).to_be_focused()
    expect(field).to_have_accessible_name(f"New title for: {old}")
    expect(field).to_have_value(old)
    shot(page, "chats-desktop-renaming")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("  Durable queues  ")
    page.keyboard.press("Enter")
    expect(item(page, chat_id).locator(".chat-link-title")).to_have_text("Durable queues")
    expect(page.locator("#chat-title")).to_have_text("Durable queues")  # the open chat
    assert api_chat(page, stack.base_url, chat_id)["title"] == "Durable queues"
    rename = item(page, chat_id).locator(".chat-rename")
    expect(rename).to_be_focused()  # back where the rename started
    expect(rename).to_have_accessible_name("Rename chat: Durable queues")
    # Escape leaves the title as it was, on the page and on the server.
    page.keyboard.press("Enter")
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.type("Not this one")
    page.keyboard.press("Escape")
    expect(item(page, chat_id).locator(".chat-link-title")).to_have_text("Durable queues")
    expect(item(page, chat_id).locator(".chat-rename")).to_be_focused()
    assert api_chat(page, stack.base_url, chat_id)["title"] == "Durable queues"
    # Another chat (not the open one) is renamed with the mouse; leaving the field saves.
    item(page, other).hover()
    item(page, other).locator(".chat-rename").click()
    item(page, other).locator(".chat-rename-input").fill("Renamed by clicking away")
    page.locator("#chat-title").click()
    expect(item(page, other).locator(".chat-link-title")).to_have_text("Renamed by clicking away")
    assert api_chat(page, stack.base_url, other)["title"] == "Renamed by clicking away"
    expect(page.locator("#chat-title")).to_have_text("Durable queues")
    # A reload shows the titles from the server.
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    assert titles(page) == ["Durable queues", "Renamed by clicking away"]


def test_a_poll_does_not_take_the_title_field_away(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    chat_id = new_chat(page, "Keep my field [demo:words=5]")
    item(page, chat_id).locator(".chat-rename").focus()
    page.keyboard.press("Enter")
    page.keyboard.press("End")  # the title starts selected
    page.keyboard.type(" and more")
    # What the 10 s poll and another tab's post do: refresh the list.
    with page.expect_response(lambda r: r.url.endswith("/api/v1/chats")):
        page.evaluate("window.dispatchEvent(new Event('online'))")
    page.wait_for_timeout(300)  # the page takes the answer in (nothing is timed)
    field = item(page, chat_id).locator(".chat-rename-input")
    expect(field).to_be_focused()
    expect(field).to_have_value("Keep my field [demo:words=5] and more")


# -- 2. search -------------------------------------------------------------------------------


def test_search_chats_by_title(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    queries: list[str] = []

    def seen(request: Request) -> None:
        if "/api/v1/chats?q=" in request.url:
            queries.append(request.url.split("?q=", 1)[1])

    page.on("request", seen)
    for text in ["Alpha apples", "Beta BANANAS", "Gamma 50% grapes", "Delta 50 dates"]:
        new_chat(page, f"{text} [demo:words=5]")
    search = page.locator("#chat-search")
    expect(search).to_have_accessible_name("Search chats by title")
    search.fill("banana")  # the server matches, ignoring case
    expect(listed(page)).to_have_text(["Beta BANANAS [demo:words=5]"], timeout=T)
    expect(page.locator("#list-label")).to_have_text("Matching chats")
    assert queries and queries[-1] == "banana"
    shot(page, "chats-desktop-search")
    search.fill("50%")  # a LIKE wildcard matches only itself
    expect(listed(page)).to_have_text(["Gamma 50% grapes [demo:words=5]"], timeout=T)
    search.fill("no such chat")
    expect(page.locator("#chat-list li")).to_have_count(0, timeout=T)
    expect(page.locator("#list-empty")).to_be_visible()
    expect(page.locator("#list-empty")).to_have_text(
        "No chat titles contain \u201cno such chat\u201d."
    )
    # Escape clears the box and lists every chat again.
    search.press("Escape")
    expect(search).to_have_value("")
    expect(page.locator("#chat-list li")).to_have_count(4, timeout=T)
    expect(page.locator("#list-label")).to_have_text("Recent")
    expect(page.locator("#list-empty")).to_be_hidden()
    # Typing fast asks once the typing pauses, not once per key.
    before = len(queries)
    search.press_sequentially("apple", delay=20)
    expect(listed(page)).to_have_text(["Alpha apples [demo:words=5]"], timeout=T)
    assert len(queries) - before < len("apple"), queries[before:]


# -- 3. regenerate ---------------------------------------------------------------------------


def test_regenerate_replaces_the_last_answer_in_place(
    page: Page, session: Session, stack: Stack
) -> None:
    open_app(page, stack.base_url)
    chat_id = send(page, "First question [demo:words=20]")
    wait_status(page, "done")
    send(page, "Second question [demo:words=300] [demo:rate=60]")
    expect(page.locator(".msg.assistant")).to_have_count(2, timeout=T)
    first = page.locator(".msg.assistant").first
    regen = answer(page).locator(".act[data-action=regenerate]")
    wait_text(page, 30)
    expect(regen).to_be_hidden()  # not while it is being written
    wait_status(page, "done")
    expect(first.locator(".act[data-action=regenerate]")).to_be_hidden()  # only the last
    expect(regen).to_be_visible()
    expect(regen).to_have_accessible_name("Regenerate")
    old_id, old_sid = answer(page).get_attribute("data-id"), stream_id(page)
    other = session.new_page()  # a second tab on the chat follows the replacement
    open_app(other, stack.base_url, chat_id)
    expect(other.locator(f".msg[data-id='{old_id}']")).to_have_count(1)
    shot(page, "chats-desktop-regenerate")
    regen.focus()
    page.keyboard.press("Enter")
    expect(page.locator(f".msg[data-id='{old_id}']")).to_have_count(0, timeout=T)
    expect(page.locator(".msg.assistant")).to_have_count(2)
    expect(page.locator(".msg")).to_have_count(4)
    new_id = answer(page).get_attribute("data-id")
    assert new_id != old_id and stream_id(page) != old_sid
    # It streams in the old one's place: the last message, after the same question.
    assert page.locator(".msg").last.get_attribute("data-id") == new_id
    expect(page.locator(".msg.user").last.locator(".bubble")).to_have_text(
        "Second question [demo:words=300] [demo:rate=60]"
    )
    wait_text(page, 30)
    expect(answer(page)).to_have_attribute("aria-busy", "true")
    expect(page.locator("#stop")).to_be_visible()
    wait_status(page, "done")
    assert_exact(page, stack.base_url, chat_id)
    assert stored_answer(page, stack.base_url, chat_id)["id"] == new_id
    gone = page.request.get(f"{stack.base_url}/api/v1/streams/{old_sid}")
    assert gone.status == 404
    expect(other.locator(f".msg[data-id='{old_id}']")).to_have_count(0, timeout=T)
    expect(other.locator(f".msg[data-id='{new_id}']")).to_have_attribute(
        "data-status", "done", timeout=T
    )
    assert other.locator(f".msg[data-id='{new_id}']").get_attribute("data-raw") == (
        answer(page).get_attribute("data-raw")
    )
    # A failed answer is regenerated too (here it fails again: same prompt, same demo).
    send(page, "Break [demo:words=40] [demo:fail-after=3]")
    expect(page.locator(".msg.assistant")).to_have_count(3, timeout=T)
    wait_status(page, "failed")
    failed_id = answer(page).get_attribute("data-id")
    answer(page).locator(".act[data-action=regenerate]").click()
    expect(page.locator(f".msg[data-id='{failed_id}']")).to_have_count(0, timeout=T)
    wait_status(page, "failed")
    expect(page.locator(".msg.assistant")).to_have_count(3)


def test_a_refused_regenerate_says_why(page: Page, stack: Stack) -> None:
    page.add_init_script("window.relayTest = { feed: false }")  # the page has not heard yet
    open_app(page, stack.base_url)
    chat_id = send(page, "Busy elsewhere [demo:words=20]")
    wait_status(page, "done")
    old_id = answer(page).get_attribute("data-id")
    # Another device starts an answer the page does not know of yet, and the page's
    # Regenerate is pressed at once (in one go, so the page's poll cannot show it first).
    sid = page.evaluate(
        """async ([chatId, oldId]) => {
          const resp = await fetch('/api/v1/chat', {
            method: 'POST', headers: {'Content-Type': 'application/json'},
            body: JSON.stringify({chatId, message: 'Elsewhere [demo:words=800] [demo:rate=20]'}),
          });
          document.querySelector(`.msg[data-id="${oldId}"] .act[data-action=regenerate]`).click();
          return (await resp.json()).streamId;
        }""",
        [chat_id, old_id],
    )
    expect(page.locator("#notice")).to_be_visible(timeout=T)
    expect(page.locator("#notice-text")).to_contain_text("Could not regenerate the answer")
    expect(page.locator("#notice-retry")).to_be_visible()
    assert stored_answer(page, stack.base_url, chat_id)["streamId"] == sid  # untouched
    page.request.post(f"{stack.base_url}/api/v1/streams/{sid}/cancel")


# -- 4. model picker -------------------------------------------------------------------------


def test_no_model_picker_with_one_model(page: Page, stack: Stack) -> None:
    open_app(page, stack.base_url)
    expect(page.locator("#model-pick")).to_be_hidden()
    chat_id = send(page, "One model [demo:words=5]")
    wait_status(page, "done")
    assert stored_answer(page, stack.base_url, chat_id)["model"] == "demo"


def test_the_model_picker_is_kept_per_chat(page: Page, many_models: str) -> None:
    open_app(page, many_models)
    pick = page.locator("#model")
    expect(page.locator("#model-pick")).to_be_visible()
    expect(pick).to_have_accessible_name("Model")
    assert pick.locator("option").all_inner_texts() == ["demo", "demo-large", "demo-small"]
    expect(pick).to_have_value("demo")
    pick.select_option("demo-large")
    first = send(page, "Large please [demo:words=5]")
    wait_status(page, "done")
    assert stored_answer(page, many_models, first)["model"] == "demo-large"
    stored = page.evaluate("(id) => localStorage.getItem('relay.model:' + id)", first)
    assert stored == "demo-large"
    page.click("#new-chat")
    expect(pick).to_have_value("demo")  # a new chat starts from the default
    second = send(page, "Default please [demo:words=5]")
    wait_status(page, "done")
    assert stored_answer(page, many_models, second)["model"] == "demo"
    # Back to the first chat: its model again, also after a reload; regenerate asks it too.
    item(page, first).locator(".chat-link").click()
    expect(pick).to_have_value("demo-large")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    expect(pick).to_have_value("demo-large")
    pick.select_option("demo-small")
    old_id = answer(page).get_attribute("data-id")
    answer(page).locator(".act[data-action=regenerate]").click()
    expect(page.locator(f".msg[data-id='{old_id}']")).to_have_count(0, timeout=T)
    wait_status(page, "done")
    assert stored_answer(page, many_models, first)["model"] == "demo-small"
    shot(page, "chats-desktop-model-picker")


# -- 5. a code block's Copy button while the block streams ------------------------------------

CODE = "\n".join(f"step_{i} = compute({i})  # line {i}" for i in range(40))
CODE_MESSAGE = f"```python\n{CODE}\n```\n[demo:echo] [demo:rate=15]"

SAME_BUTTON = """() => {
  const b = [...document.querySelectorAll('.msg.assistant')].pop()?.querySelector('.code-copy');
  return b === window.__copyButton && b.isConnected;
}"""

CODE_LENGTH = """() => [...document.querySelectorAll('.msg.assistant')].pop()
  .querySelector('.code-block pre > code').textContent.length"""


def wait_code_grows(page: Page, by: int) -> int:
    start = int(page.evaluate(CODE_LENGTH))
    page.wait_for_function(f"({CODE_LENGTH})() >= {start + by}", timeout=T)
    return int(page.evaluate(CODE_LENGTH))


def test_the_code_copy_button_survives_streaming(
    page: Page, session: Session, stack: Stack
) -> None:
    session.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.base_url)
    open_app(page, stack.base_url)
    chat_id = send(page, CODE_MESSAGE)
    button = answer(page).locator(".code-copy")
    expect(button).to_have_count(1, timeout=T)
    wait_code_grows(page, 20)
    wait_status(page, "streaming")
    # Keyboard: the focus stays on the button while the block grows, and Enter copies.
    button.focus()
    page.evaluate("window.__copyButton = document.activeElement")
    assert page.evaluate("document.activeElement.classList.contains('code-copy')")
    wait_code_grows(page, 30)
    assert page.evaluate(SAME_BUTTON), "the Copy button was rebuilt while the block streamed"
    assert page.evaluate("document.activeElement === window.__copyButton")
    page.keyboard.press("Enter")
    expect(button).to_contain_text("Copied")
    copied = str(page.evaluate("navigator.clipboard.readText()"))
    assert copied and CODE.startswith(copied)
    wait_code_grows(page, 30)
    expect(button).to_contain_text("Copied")  # kept through the re-renders
    assert page.evaluate(SAME_BUTTON)
    # Mouse: a press and release with a re-render in between is still a click. (Scrolled
    # up a little first, so the thread stops following the new text and the button stays
    # under the pointer.)
    page.evaluate("navigator.clipboard.writeText('')")
    expect(button).to_contain_text("Copy", timeout=T)
    page.locator("#thread").evaluate("(t) => { t.scrollTop -= 40; }")
    expect(page.locator("#jump")).to_be_visible(timeout=T)
    box = button.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    wait_code_grows(page, 30)
    page.mouse.up()
    expect(button).to_contain_text("Copied")
    copied = str(page.evaluate("navigator.clipboard.readText()"))
    assert len(copied) > 0 and CODE.startswith(copied)
    shot(page, "chats-desktop-code-copy-streaming")
    wait_status(page, "done", timeout=T_ANSWER)  # 355 chunks at 15 a second
    stored = stored_answer(page, stack.base_url, chat_id)
    assert stored["content"] == answer(page).get_attribute("data-raw") == f"```python\n{CODE}\n```"
    assert page.evaluate(SAME_BUTTON)
    assert answer(page).locator(".code-block pre > code").text_content() == CODE


# -- screenshots and axe: desktop and phone, light and dark -----------------------------------


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_chat_actions_in_both_themes_and_sizes(
    browser: Browser, stack: Stack, many_models: str, theme: str
) -> None:
    """The sidebar with a search and a title being edited, an answer with Regenerate, the
    model picker; at desktop and phone sizes. axe-core finds no serious or critical
    violation in these states."""
    findings: dict[str, list[Any]] = {}
    incomplete: dict[str, list[Any]] = {}
    for s in new_session(browser, DESKTOP):
        page = s.new_page()
        page.emulate_media(reduced_motion="reduce")
        open_app(page, many_models)
        set_theme(page, theme)
        new_chat(page, "Write-ahead logs [demo:words=40]")
        chat_id = new_chat(page, "Durable queues, briefly [demo:words=60]")
        expect(answer(page).locator(".act[data-action=regenerate]")).to_be_visible()
        expect(page.locator("#model-pick")).to_be_visible()
        page.fill("#chat-search", "queue")
        expect(page.locator("#chat-list li")).to_have_count(1, timeout=T)
        audit(page, "search", findings, incomplete)
        shot(page, f"chats-desktop-{theme}")
        item(page, chat_id).locator(".chat-rename").click()
        expect(item(page, chat_id).locator(".chat-rename-input")).to_be_focused()
        audit(page, "renaming", findings, incomplete)
        shot(page, f"chats-desktop-{theme}-renaming")
        page.keyboard.press("Escape")
        page.set_viewport_size(PHONE)
        shot(page, f"chats-phone-{theme}")
        page.click("#open-sidebar")
        page.wait_for_function(
            "document.getElementById('sidebar').getBoundingClientRect().left >= 0"
        )
        expect(item(page, chat_id).locator(".chat-rename")).to_be_visible()
        audit(page, "phone-chat-list", findings, incomplete)
        shot(page, f"chats-phone-{theme}-sidebar")
    ARTIFACTS.mkdir(exist_ok=True)
    report = {"violations": findings, "incomplete": incomplete}
    (ARTIFACTS / f"chats-axe-{theme}.json").write_text(json.dumps(report, indent=2))
    serious = {
        state: [v for v in found if v["impact"] in ("serious", "critical")]
        for state, found in findings.items()
    }
    assert not any(serious.values()), json.dumps(serious, indent=2)


# The chat list's answers take 200 ms, four times the poll period of 50 ms.
SLOW_LIST = """
window.relayTest = { pollMs: 50 };
const realFetch = window.fetch.bind(window);
window.fetch = async (path, options) => {
  const resp = await realFetch(path, options);
  const get = !options || !options.method || options.method === "GET";
  if (get && /\\/api\\/v1\\/chats(\\?|$)/.test(String(path))) {
    await new Promise((done) => setTimeout(done, 1000));
  }
  return resp;
};
"""


def test_the_chat_list_is_shown_when_it_answers_slower_than_the_poll(
    page: Page, session: Session, stack: Stack
) -> None:
    """A list poll is timed from the end of the one before: when the list takes longer to
    answer than the poll period, polls do not pile up and make each other's answer stale
    (before, each answer was dropped for a newer request, and no list was ever shown). The
    feed goes live while a poll is answered (the list takes a second here, the poll comes
    every 50 ms): that only changes the period; before, it started a second chain of polls,
    each of whose answers made the other's stale, and again no list was shown."""
    open_app(page, stack.base_url)
    chat_id = send(page, "Listed however slow the list is [demo:words=5]")
    wait_status(page, "done")
    slow = session.new_page()
    slow.add_init_script(SLOW_LIST)
    open_app(slow, stack.base_url)
    link = slow.locator(f"#chat-list .chat-link[data-chat-id='{chat_id}']")
    expect(link).to_have_count(1, timeout=T)
    requests = slow.evaluate(
        "performance.getEntriesByType('resource')"
        ".filter((e) => /\\/api\\/v1\\/chats(\\?|$)/.test(e.name)).length"
    )
    assert requests >= 2, requests  # the list was polled, slower than its period


def test_a_click_on_a_chat_lands_while_the_list_is_refreshed(page: Page, stack: Stack) -> None:
    """The list poll (every 50 ms here) brings the same chats again and again: a press and a
    release on a chat's link with polls in between still open that chat (the links are not
    replaced under the pointer; before, the release landed on a new node and the click was
    lost)."""
    page.add_init_script("window.relayTest = { pollMs: 50 }")
    open_app(page, stack.base_url)
    first = send(page, "The chat to come back to [demo:words=5]")
    wait_status(page, "done")
    page.click("#new-chat")
    send(page, "Another chat [demo:words=5]")
    wait_status(page, "done")
    link = page.locator(f"#chat-list .chat-link[data-chat-id='{first}']")
    # The list settles (both chats, the second one open) before the press: a redraw for a
    # change (the open chat, a new chat) may replace the links, and only one that changes
    # nothing must not. Hovering waits for the link to hold still under the pointer (taking a
    # bounding box once could meet the node as a redraw detached it: CI saw None).
    expect(page.locator("#chat-list .chat-link")).to_have_count(2, timeout=T)
    expect(page.locator("#chat-list .chat-link[aria-current='page']")).not_to_have_attribute(
        "data-chat-id", first, timeout=T
    )
    expect(page.locator("#chat-list .chat-link[aria-current='page']")).to_have_count(1)
    page.evaluate(
        """() => {
          window.__polls = 0;
          new PerformanceObserver((list) => {
            window.__polls += list.getEntries()
              .filter((e) => e.name.endsWith('/api/v1/chats')).length;
          }).observe({ type: 'resource', buffered: false });
        }"""
    )
    link.hover()
    page.mouse.down()
    # Several polls answered between the press and the release (each starts 50 ms after the
    # previous one ends, so how many fit in a given time depends on the server).
    page.wait_for_function("window.__polls >= 3", timeout=T)
    page.mouse.up()
    expect(page.locator(".msg.user")).to_contain_text("The chat to come back to", timeout=T)
    expect(link).to_have_attribute("aria-current", "page")
