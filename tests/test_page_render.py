"""How answers are rendered on the chat page (issue 13, second part), in a real Chromium
against the real stack: Markdown that stays right in every tab state (reference-style links
whose definitions arrive later, also in a hidden tab), highlighted code blocks with a Copy
button, the light/dark toggle with its contrast in both themes, and axe-core's audit of the
page's main states. Screenshots go to test-artifacts/render-*.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.chromium import DESKTOP, PHONE, Session, new_session
from tests.conftest import ON_SQLITE, Stack
from tests.test_browser import (
    ARTIFACTS,
    T,
    answer,
    assert_exact,
    open_app,
    send,
    shot,
    wait_status,
    wait_text,
)
from tests.test_page import CONTRAST_SCRIPT

pytestmark = ON_SQLITE

# -- 1. reference-style links, visible and hidden tabs ---------------------------------------

# Long link targets (the issue saw 93-222 of 626 characters): they stream in over many
# renders, so every render before the last one sees a definition cut short.
GUIDE = "https://example.com/guide/" + "/".join(f"chapter-{n:02d}-section" for n in range(14))
SPEC = "https://example.org/spec?" + "&".join(f"param{n}=value-{n:03d}" for n in range(20))
LONG = "https://example.net/docs/" + "-".join(f"w{n:03d}" for n in range(120)) + "#end"
REFERENCES_TEXT = f"""\
Here are the sources, cited by reference: [the guide][guide] and [the spec][spec].

A second paragraph mentions the [Guide] again, and a shortcut [spec].

- a list item with [a long one][long]
- another item, plain text

> a quote that cites [long]

| source | link |
|---|---|
| guide | [cell link][guide] |

An [inline link](https://example.com/inline) needs no definition.

[guide]: {GUIDE}
[spec]: {SPEC} "The spec"
[long]: {LONG}
"""
REFERENCE_HREFS = [GUIDE, SPEC, GUIDE, SPEC, LONG, LONG, GUIDE, "https://example.com/inline"]

# A hidden tab, as Chromium makes it: document.visibilityState is "hidden" and animation
# frames do not run (they are queued until the tab is shown). The page then renders with its
# hidden-tab timer; window.__hidden counts what it used.
HIDE_SCRIPT = """() => {
  const state = { frames: [], rafCalls: 0, hiddenTimers: 0,
                  realRaf: window.requestAnimationFrame, realTimeout: window.setTimeout };
  window.__hidden = state;
  Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => 'hidden' });
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => true });
  window.requestAnimationFrame = (cb) => { state.rafCalls += 1; state.frames.push(cb); return 0; };
  window.setTimeout = function (fn, ms, ...rest) {
    if (ms === 250) state.hiddenTimers += 1;
    return state.realTimeout.call(window, fn, ms, ...rest);
  };
  document.dispatchEvent(new Event('visibilitychange'));
}"""

SHOW_SCRIPT = """() => {
  const state = window.__hidden;
  delete document.visibilityState;
  delete document.hidden;
  window.requestAnimationFrame = state.realRaf;
  window.setTimeout = state.realTimeout;
  for (const cb of state.frames.splice(0)) state.realRaf.call(window, cb);
  document.dispatchEvent(new Event('visibilitychange'));
}"""

# Every href a link in an answer ever had, in the order they appeared.
HREF_LOG_SCRIPT = """
window.__hrefs = [];
new MutationObserver((mutations) => {
  for (const m of mutations) for (const n of m.addedNodes) {
    if (n.nodeType !== 1 || !n.closest('.msg.assistant .md')) continue;
    for (const a of n.matches('a') ? [n] : n.querySelectorAll('a')) {
      window.__hrefs.push(a.getAttribute('href'));
    }
  }
}).observe(document, { subtree: true, childList: true });
"""


def send_polling(page: Page, text: str) -> str:
    """send() for a page whose animation frames do not run: poll with a timer instead."""
    page.fill("#input", text)
    page.press("#input", "Enter")
    page.wait_for_function("location.hash.length > 1", timeout=T, polling=100)
    return str(page.evaluate("decodeURIComponent(location.hash.slice(1))"))


def wait_raw(page: Page, chars: int) -> None:
    page.wait_for_function(
        """(n) => { const a = [...document.querySelectorAll('.msg.assistant')].pop();
                    return a && (a.dataset.raw || '').length >= n; }""",
        arg=chars,
        timeout=T,
        polling=100,
    )


def hrefs(page: Page) -> list[str]:
    return [
        str(h)
        for h in answer(page)
        .locator(".md a")
        .evaluate_all("(links) => links.map((a) => a.getAttribute('href'))")
    ]


@pytest.mark.parametrize("tab", ["visible", "hidden", "hidden-then-visible"])
def test_reference_links_are_right_in_every_tab_state(
    page: Page, session: Session, stack: Stack, tab: str
) -> None:
    """An answer whose reference definitions come last, streamed slowly: when it ends, the
    page's links are exactly those a fresh render of the stored text gives, whether the tab
    was visible, hidden all along, or shown again half-way."""
    page.add_init_script(HREF_LOG_SCRIPT)
    open_app(page, stack.base_url)
    if tab != "visible":
        page.evaluate(HIDE_SCRIPT)
    chat_id = send_polling(page, REFERENCES_TEXT + "\n[demo:echo] [demo:rate=120]")
    if tab == "hidden-then-visible":
        wait_raw(page, REFERENCES_TEXT.index("[spec]: "))
        page.evaluate(SHOW_SCRIPT)
    wait_status(page, "done")
    shown = assert_exact(page, stack.base_url, chat_id)
    assert shown == REFERENCES_TEXT.strip()
    if tab == "hidden":
        used = page.evaluate("[window.__hidden.rafCalls, window.__hidden.hiddenTimers]")
        assert used[0] == 0 and used[1] > 0, f"not the hidden-tab path: {used}"
    # The scenario happened: links were shown with a definition still cut short.
    seen = page.evaluate("window.__hrefs")
    assert any(h != u and u.startswith(h) for h in seen for u in (GUIDE, SPEC, LONG)), seen
    final = hrefs(page)
    assert final == REFERENCE_HREFS
    titles = (
        answer(page).locator(".md a[title]").evaluate_all("(links) => links.map((a) => a.title)")
    )
    assert titles == ["The spec", "The spec"]
    html = answer(page).locator(".md").inner_html()
    fresh = session.new_page()  # the stored text, rendered at once
    open_app(fresh, stack.base_url, chat_id)
    wait_status(fresh, "done")
    assert hrefs(fresh) == final
    assert answer(fresh).locator(".md").inner_html() == html
    if tab == "hidden":
        page.evaluate(SHOW_SCRIPT)
        shot(page, "render-desktop-reference-links")


# -- 2. code blocks: highlighting and Copy ---------------------------------------------------

PYTHON_CODE = (
    "def greet(name: str) -> str:\n"
    "    # say hello\n"
    '    return f"Hello, {name}!" + "<b>not bold</b>"'
)
PLAIN_CODE = 'echo "<script>window.__pwned = 1</script>" <img src=x onerror=alert(1)>'
JS_CODE = "const answer = 42; // the answer"
CODE_TEXT = f"""\
Here is a function:

```python
{PYTHON_CODE}
```

And a command, in a fence that names no language:

```
{PLAIN_CODE}
```

A fence whose language tries to break out of its attribute:

```js"onmouseover="window.__pwned=2
{JS_CODE}
```

- in a list:

  ```javascript
  {JS_CODE}
  ```
"""


def code_blocks(page: Page) -> Any:
    return answer(page).locator(".md .code-block")


def test_code_blocks_are_highlighted_safely_and_copied(
    page: Page, session: Session, stack: Stack
) -> None:
    session.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=stack.base_url)
    open_app(page, stack.base_url)
    chat_id = send(page, CODE_TEXT + "\n[demo:echo] [demo:rate=200]")
    wait_text(page, CODE_TEXT.index("```\n\nAnd"))
    # Highlighted while it streams in, not only at the end.
    expect(code_blocks(page).first.locator("code.hljs .hljs-keyword").first).to_have_text("def")
    wait_status(page, "done")
    assert assert_exact(page, stack.base_url, chat_id) == CODE_TEXT.strip()
    blocks = code_blocks(page)
    expect(blocks).to_have_count(4)
    python = blocks.nth(0)
    expect(python.locator(".code-lang")).to_have_text("python")
    expect(python.locator("code")).to_have_attribute("data-lang", "python")
    assert python.locator(".hljs-keyword").all_inner_texts()[:1] == ["def"]
    expect(python.locator(".hljs-comment")).to_have_text("# say hello")
    assert python.locator(".hljs-string").count() >= 2
    # The code reads exactly as written: highlighting only wraps it in spans.
    for i, code in enumerate([PYTHON_CODE, PLAIN_CODE, JS_CODE, JS_CODE]):
        assert blocks.nth(i).locator("pre > code").text_content() == code
    plain = blocks.nth(1)
    expect(plain.locator(".code-lang")).to_have_text("code")
    assert plain.locator("code span").count() == 0  # no language named: shown plain
    hostile = blocks.nth(2)
    expect(hostile.locator(".code-lang")).to_have_text('js"onmouseover="window.__pwned=2')
    attrs = hostile.locator("code").evaluate("(c) => c.getAttributeNames()")
    assert sorted(attrs) == ["data-lang"]
    expect(blocks.nth(3).locator("code.hljs .hljs-keyword")).to_have_text("const")
    # Nothing but highlight.js's spans (class only) inside code; no markup from the answer.
    inside = (
        answer(page)
        .locator(".md pre code *")
        .evaluate_all("(els) => els.map((e) => [e.tagName, ...e.getAttributeNames()].join(' '))")
    )
    assert inside and set(inside) == {"SPAN class"}, set(inside)
    md = answer(page).locator(".md")
    assert md.locator("script, img, [onmouseover], [onerror]").count() == 0
    assert page.evaluate("window.__pwned") is None
    html = md.inner_html()
    # Copy, per code block: the exact code, read back from the clipboard.
    for i, code in [(0, PYTHON_CODE), (1, PLAIN_CODE)]:
        button = blocks.nth(i).locator(".code-copy")
        label = "Copy python code" if i == 0 else "Copy code"
        expect(button).to_have_accessible_name(label)
        button.click()
        expect(button).to_contain_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == code
    expect(blocks.nth(0).locator(".code-copy")).to_contain_text("Copy", timeout=T)
    # From the keyboard too.
    blocks.nth(3).locator(".code-copy").focus()
    page.keyboard.press("Enter")
    page.wait_for_function(
        "async (code) => (await navigator.clipboard.readText()) === code", arg=JS_CODE, timeout=T
    )
    # The whole answer's Copy still copies the Markdown source.
    answer(page).locator(".act[data-action=copy]").click()
    expect(answer(page).locator(".act[data-action=copy]")).to_contain_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == CODE_TEXT.strip()
    # A reload renders the stored text the same way.
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    assert answer(page).locator(".md").inner_html() == html
    blocks.nth(0).scroll_into_view_if_needed()
    shot(page, "render-desktop-code")


# -- 3. light / dark -------------------------------------------------------------------------


def background(page: Page) -> str:
    return str(page.evaluate("getComputedStyle(document.body).backgroundColor"))


WHITE, DARK = "rgb(255, 255, 255)", "rgb(21, 22, 26)"


def test_theme_follows_the_system_and_the_toggle_is_kept(page: Page, stack: Stack) -> None:
    page.emulate_media(color_scheme="light")
    open_app(page, stack.base_url)
    toggle = page.locator("#theme")
    expect(toggle).to_have_attribute("data-choice", "system")
    expect(toggle).to_have_accessible_name("Theme: follows the system. Switch to light")
    assert page.evaluate("document.documentElement.dataset.theme") is None
    assert background(page) == WHITE
    page.emulate_media(color_scheme="dark")  # the system changes: the page follows
    assert background(page) == DARK
    toggle.click()  # light, although the system is dark
    expect(toggle).to_have_attribute("data-choice", "light")
    expect(toggle).to_have_accessible_name("Theme: light. Switch to dark")
    assert background(page) == WHITE
    assert page.evaluate("localStorage.getItem('relay.theme')") == "light"
    toggle.click()
    expect(toggle).to_have_attribute("data-choice", "dark")
    page.emulate_media(color_scheme="light")
    assert background(page) == DARK
    assert page.evaluate("localStorage.getItem('relay.theme')") == "dark"
    # Kept across a reload, and applied before the page's script runs (no light flash).
    page.reload(wait_until="commit")
    page.wait_for_selector("body", state="attached")
    assert page.evaluate("document.documentElement.dataset.theme") == "dark"
    expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=T)
    expect(toggle).to_have_attribute("data-choice", "dark")
    assert background(page) == DARK
    # Another tab of the browser follows a change.
    other = page.context.new_page()
    open_app(other, stack.base_url)
    assert background(other) == DARK
    toggle.press("Enter")  # keyboard: back to following the system
    expect(toggle).to_have_attribute("data-choice", "system")
    assert page.evaluate("localStorage.getItem('relay.theme')") is None
    assert background(page) == WHITE
    expect(other.locator("#theme")).to_have_attribute("data-choice", "system")
    assert background(other) == WHITE
    other.close()


def set_theme(page: Page, choice: str) -> None:
    toggle = page.locator("#theme")
    for _ in range(3):
        if toggle.get_attribute("data-choice") == choice:
            return
        toggle.click()
    expect(toggle).to_have_attribute("data-choice", choice)


def fill_statuses(page: Page, stack: Stack) -> str:
    """A chat with a highlighted answer, a failed one and a stopped one."""
    chat_id = send(page, CODE_TEXT + "\n[demo:echo] [demo:rate=400]")
    wait_status(page, "done")
    send(page, "One that fails [demo:words=60] [demo:fail-after=5]")
    expect(page.locator(".msg.assistant")).to_have_count(2, timeout=T)
    wait_status(page, "failed")
    send(page, "One that is stopped [demo:words=400]")
    expect(page.locator(".msg.assistant")).to_have_count(3, timeout=T)
    wait_text(page, 40)
    page.click("#stop")
    wait_status(page, "cancelled")
    page.fill("#input", "")
    return chat_id


@pytest.mark.parametrize("size", ["desktop", "phone"])
def test_contrast_in_both_themes(browser: Browser, stack: Stack, size: str) -> None:
    """Every text, highlighted code included, keeps >= 4.5:1 in light and dark, whether set
    with the toggle or following the system."""
    for s in new_session(browser, DESKTOP if size == "desktop" else PHONE):
        page = s.new_page()
        page.emulate_media(color_scheme="light", reduced_motion="reduce")
        open_app(page, stack.base_url)
        fill_statuses(page, stack)
        answer(page).scroll_into_view_if_needed()
        code = page.locator(".msg.assistant").first.locator(".code-block").first
        schemes: list[tuple[str, Literal["light", "dark"]]] = [
            ("light", "dark"),
            ("dark", "light"),
            ("system", "dark"),
        ]
        for theme, system in schemes:
            page.emulate_media(color_scheme=system, reduced_motion="reduce")
            set_theme(page, theme)
            results: list[list[Any]] = page.evaluate(CONTRAST_SCRIPT)
            needed = ["status", "act-label", "conn-label"]
            if size == "desktop":
                needed += ["chat-link-time", "list-label", "hint"]
            code.scroll_into_view_if_needed()
            results += page.evaluate(CONTRAST_SCRIPT)
            measured = " ".join(str(r[0]) for r in results)
            for name in [*needed, "hljs-keyword", "hljs-string", "hljs-comment", "code-lang"]:
                assert name in measured, f"{name} was not measured ({theme})"
            low = [r for r in results if r[2] < 4.5]
            assert not low, f"text below 4.5:1 with theme {theme} (system {system}): {low}"
            shown = "dark" if theme == "dark" or (theme, system) == ("system", "dark") else "light"
            shot(page, f"render-{size}-{shown}{'-system' if theme == 'system' else ''}")
        if size == "phone":
            for theme in ["light", "dark"]:
                set_theme(page, theme)
                page.click("#open-sidebar")
                page.wait_for_function(
                    "document.getElementById('sidebar').getBoundingClientRect().left >= 0"
                )
                results = page.evaluate(CONTRAST_SCRIPT)
                low = [r for r in results if r[2] < 4.5]
                assert not low, f"sidebar text below 4.5:1 ({theme}): {low}"
                shot(page, f"render-phone-{theme}-sidebar")
                page.click("#scrim", position={"x": 370, "y": 400})


# -- 4. axe-core -------------------------------------------------------------------------------

AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"  # see tests/vendor/README.md

AXE_RUN = """async () => {
  const result = await axe.run(document);
  return {
    violations: result.violations.map((v) => ({
      id: v.id, impact: v.impact, help: v.help,
      nodes: v.nodes.slice(0, 5).map((n) => `${n.target.join(' ')}: ${n.failureSummary}`),
    })),
    passed: result.passes.map((p) => p.id),
    incomplete: result.incomplete.map((v) => ({
      id: v.id, impact: v.impact,
      nodes: v.nodes.map((n) => `${n.target.join(' ')}: ${n.any.map((c) => c.message)}`),
    })),
  };
}"""


def audit(
    page: Page, state: str, findings: dict[str, list[Any]], incomplete: dict[str, list[Any]]
) -> None:
    """Run axe-core (loaded from the local file) on the page as it is now."""
    if not page.evaluate("typeof window.axe === 'object'"):
        page.add_script_tag(path=str(AXE))
    result = page.evaluate(AXE_RUN)
    # axe really checked this page: the rules that matter here ran and passed somewhere.
    for rule in ("color-contrast", "button-name", "aria-allowed-attr", "link-name", "region"):
        if rule == "link-name" and state in ("empty",):
            continue
        assert rule in result["passed"], f"axe did not check {rule} ({state})"
    findings[state] = result["violations"]
    incomplete[state] = result["incomplete"]


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_axe_finds_no_serious_violations(browser: Browser, stack: Stack, theme: str) -> None:
    """axe-core on the page's main states, in both themes: the empty page, an answer being
    written, a finished answer (code blocks, a table, links), the chat list in the phone's
    drawer. Serious and critical violations fail the test; all findings are written to
    test-artifacts/render-axe-<theme>.json."""
    findings: dict[str, list[Any]] = {}
    incomplete: dict[str, list[Any]] = {}  # what axe could not decide (kept for people)
    for s in new_session(browser, DESKTOP):
        page = s.new_page()
        page.emulate_media(reduced_motion="reduce")  # no animation halfway through a check
        open_app(page, stack.base_url)
        set_theme(page, theme)
        audit(page, "empty", findings, incomplete)
        chat_id = send(page, CODE_TEXT + "\n" + REFERENCES_TEXT + "\n[demo:echo] [demo:rate=60]")
        wait_text(page, 200)
        wait_status(page, "streaming")
        audit(page, "streaming", findings, incomplete)
        wait_status(page, "done")
        assert_exact(page, stack.base_url, chat_id)
        audit(page, "finished", findings, incomplete)
        page.click("#new-chat")
        send(page, "A second chat [demo:words=20]")
        wait_status(page, "done")
        audit(page, "two-chats", findings, incomplete)
        page.set_viewport_size(PHONE)
        page.click("#open-sidebar")
        page.wait_for_function(
            "document.getElementById('sidebar').getBoundingClientRect().left >= 0"
        )
        audit(page, "chat-list", findings, incomplete)
        shot(page, f"render-phone-{theme}-axe-chat-list")
    ARTIFACTS.mkdir(exist_ok=True)
    report = {"violations": findings, "incomplete": incomplete}
    (ARTIFACTS / f"render-axe-{theme}.json").write_text(json.dumps(report, indent=2))
    serious = {
        state: [v for v in found if v["impact"] in ("serious", "critical")]
        for state, found in findings.items()
    }
    assert not any(serious.values()), json.dumps(serious, indent=2)
    assert set(findings) == {"empty", "streaming", "finished", "two-chats", "chat-list"}
