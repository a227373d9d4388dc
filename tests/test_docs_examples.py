"""The curl examples of README.md and docs/*.md, pasted into a shell against a live stack.

Every ```sh block is read; its curl commands (backslash continuations joined) are run with the
real ``curl`` through bash, as a reader would paste them, in a directory of their own (for the
cookie ``jar``). Only the address and the placeholders change: ``http://127.0.0.1:8000`` and
``$BASE`` become the test stack's address, ``$SID`` / ``<streamId>``, ``$CID`` / ``<chatId>``
and ``$TOKEN`` real values. Before each command the user in ``jar`` gets the answer the
example speaks of (RULES: a finished one, one still streaming, one just posted), and the
command must exit 0 with the status docs/api.md gives it.

A block that cannot be run as it is gets ``<!-- not-run: reason -->`` on the line before it.
The websocat lines of docs/api.md are not run (websocat is not installed here); their form is
checked, and the request they make is made with a WebSocket client.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from tests.conftest import Stack
from tests.procs import BIN, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,})\s*([\w-]*)")
NOT_RUN = re.compile(r"<!--\s*not-run:\s*(.+?)\s*-->")
SHELL = {"sh", "bash", "shell", "console"}
DOCUMENTED_BASE = "http://127.0.0.1:8000"
STATUS_MARK = "@@curl-status "


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    lines: list[str]
    not_run: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def read_blocks(path: Path) -> Iterator[Block]:
    """The fenced blocks of a markdown file, with the not-run reason written before each."""
    text = path.read_text().splitlines()
    i = 0
    while i < len(text):
        opening = FENCE.match(text[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        previous = next((t for t in reversed(text[:i]) if t.strip()), "")
        reason = NOT_RUN.search(previous)
        body: list[str] = []
        j = i + 1
        while j < len(text) and not text[j].strip().startswith(fence):
            body.append(text[j][len(indent) :] if text[j].startswith(indent) else text[j])
            j += 1
        yield Block(path, i + 1, lang.lower(), body, reason.group(1) if reason else None)
        i = j + 1


def shell_commands(lines: list[str]) -> Iterator[tuple[int, str]]:
    """(offset in the block, command) with continuation lines joined; comments left out."""
    start, parts = 0, list[str]()
    for offset, line in enumerate(lines):
        if not parts:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            start = offset
        if line.rstrip().endswith("\\"):
            parts.append(line.rstrip()[:-1])
            continue
        parts.append(line)
        yield start, " ".join(p.strip() for p in parts)
        parts = []


@dataclass(frozen=True)
class Example:
    where: str
    command: str


def curl_examples() -> list[Example]:
    found = []
    for path in DOCS:
        for block in read_blocks(path):
            if block.lang not in SHELL or block.not_run:
                continue
            for offset, command in shell_commands(block.lines):
                if command.startswith("curl "):
                    line = block.line + 1 + offset
                    found.append(Example(f"{path.relative_to(ROOT)}:{line}", command))
    return found


EXAMPLES = curl_examples()


@dataclass(frozen=True)
class Rule:
    """What an example needs beforehand and the status the docs give it."""

    pattern: re.Pattern[str]
    needs: str  # "nothing", "finished" (> 12 events), "streaming" or "just posted"
    status: int


RULES = [
    Rule(re.compile(r"-X POST \S*/api/v1/streams/\S+/cancel\b"), "streaming", 202),
    Rule(re.compile(r'\\"interrupt\\": true'), "streaming", 202),
    Rule(re.compile(r"/api/v1/chat\?chatId="), "just posted", 200),
    Rule(re.compile(r"text/event-stream.* -d .*/api/v1/chat\"?$"), "nothing", 200),
    Rule(re.compile(r"-d .*/api/v1/chat\"?$"), "nothing", 202),
    Rule(re.compile(r"/(readyz|healthz|api/v1/openapi\.json)\b"), "nothing", 200),
    Rule(re.compile(r"-N .*/api/v1/streams/\S+/events"), "finished", 200),
    Rule(re.compile(r"^curl -s .*/api/v1/(streams|chats)\b"), "finished", 200),
]


def rule_for(command: str) -> Rule:
    for rule in RULES:
        if rule.pattern.search(command):
            return rule
    raise AssertionError(f"no rule says what this example needs and answers: {command}")


def test_the_examples_are_found_and_each_has_a_rule() -> None:
    """Nothing slips past: every curl line sits in a ```sh block that runs or says why not,
    and each one run has a rule."""
    skipped = []
    for path in DOCS:
        for block in read_blocks(path):
            curls = [c for _, c in shell_commands(block.lines) if c.startswith("curl ")]
            if curls and block.lang not in SHELL:
                raise AssertionError(f"{block.where}: curl example in a ```{block.lang} block")
            if curls and block.not_run:
                skipped.append(block.where)
    where = {e.where.split(":")[0] for e in EXAMPLES}
    assert {"README.md", "docs/api.md"} <= where, where
    assert len(EXAMPLES) >= 12
    for example in EXAMPLES:
        rule_for(example.command)
    assert len(skipped) <= 1, f"keep not-run blocks rare: {skipped}"


# -- a user with the answer an example speaks of --------------------------------------------


def curl(cwd: Path, *args: str) -> dict[str, Any]:
    done = subprocess.run(
        ["curl", "-q", "-s", "--max-time", "30", "-c", "jar", "-b", "jar", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def post(cwd: Path, base: str, message: str) -> dict[str, Any]:
    body = json.dumps({"message": message})
    return curl(cwd, "-H", "Content-Type: application/json", "-d", body, f"{base}/api/v1/chat")


def wait_for_status(cwd: Path, base: str, stream_id: str, wanted: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        state = curl(cwd, f"{base}/api/v1/streams/{stream_id}")
        if state["status"] in wanted or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def prepare(needs: str, cwd: Path, base: str) -> dict[str, Any]:
    """Give the user in ``cwd/jar`` the answer the example needs; return the post's reply."""
    if needs == "nothing":
        return post(cwd, base, "an earlier message [demo:words=5]")  # SID/CID exist too
    if needs == "streaming":
        posted = post(cwd, base, "a long answer [demo:words=5000] [demo:rate=5]")
        state = wait_for_status(cwd, base, posted["streamId"], {"running"})
        assert state["status"] == "running", state
        return posted
    if needs == "just posted":
        return post(cwd, base, "a short answer [demo:words=40]")
    posted = post(cwd, base, "Tell me about durable queues [demo:words=120]")
    state = wait_for_status(cwd, base, posted["streamId"], {"done"})
    assert state["status"] == "done" and state["lastSeq"] > 12, state
    return posted


@pytest.fixture(scope="module")
def token(stack: Stack) -> str:
    """A bearer token from the admin command the docs name."""
    made = subprocess.run(
        [str(BIN / "flask"), "--app", "web", "create-token", f"docs-{uuid.uuid4().hex[:8]}"],
        env=stack.env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return made.stdout.split("token ", 1)[1].split()[0]


def as_pasted(command: str, base: str, ids: dict[str, str]) -> str:
    """The command with the documented address and the ``<placeholders>`` filled in."""
    command = command.replace(DOCUMENTED_BASE, base)
    command = command.replace("<streamId>", ids["SID"]).replace("<chatId>", ids["CID"])
    left = re.findall(r"<[A-Za-z]+>|\.\.\.", command)
    assert not left, f"placeholder without a value: {left} in {command}"
    return command


@pytest.fixture(scope="module")
def finished(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One user with a finished answer, shared: (its cookie jar, the post's reply)."""
    home = tmp_path_factory.mktemp("finished")
    return home / "jar", prepare("finished", home, stack.base_url)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.where for e in EXAMPLES])
def test_curl_example_works_when_pasted(
    example: Example,
    stack: Stack,
    token: str,
    finished: tuple[Path, dict[str, Any]],
    tmp_path: Path,
) -> None:
    rule = rule_for(example.command)
    if rule.needs == "finished":
        shutil.copy(finished[0], tmp_path / "jar")
        posted = finished[1]
    else:
        posted = prepare(rule.needs, tmp_path, stack.base_url)
    ids = {"SID": posted["streamId"], "CID": posted["chatId"]}
    # curl reads $CURL_HOME/.curlrc: the status goes to stderr (stdout may be redirected).
    (tmp_path / ".curlrc").write_text(
        f'write-out = "%{{stderr}}\\n{STATUS_MARK}%{{http_code}}\\n"\n'
    )
    env = {
        **os.environ, "CURL_HOME": str(tmp_path), "BASE": stack.base_url, "TOKEN": token, **ids,
    }  # fmt: skip
    command = as_pasted(example.command, stack.base_url, ids)
    try:
        done = subprocess.run(
            ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
            timeout=90,
        )  # fmt: skip
    finally:
        if rule.needs == "streaming":  # do not leave a long answer running
            curl(tmp_path, "-X", "POST", f"{stack.base_url}/api/v1/streams/{ids['SID']}/cancel")
    assert done.returncode == 0, f"{example.where}: {command}\n{done.stderr}"
    status = done.stderr.rpartition(STATUS_MARK)[2].strip()
    assert status == str(rule.status), f"{example.where}: {command}\n{done.stdout}{done.stderr}"
    body = done.stdout
    if "/events" in command or "/api/v1/chat?chatId=" in command:
        assert "event: done" in body, body  # the whole answer, to its end
    if "Last-Event-ID: 12" in command or "after=12" in command:
        first = re.search(r"^id: (\d+)$", body, re.M)
        assert first and first.group(1) == "13", body  # resumed after seq 12


# -- websocat ------------------------------------------------------------------------------


def websocat_lines() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for block in read_blocks(path):
            for offset, command in shell_commands(block.lines):
                if command.startswith("websocat "):
                    found.append((f"{path.relative_to(ROOT)}:{block.line + 1 + offset}", command))
    return found


def test_websocat_examples_connect_as_written(stack: Stack, token: str, tmp_path: Path) -> None:
    """websocat's ``-H`` takes several values (``-H 'X: y' URL`` takes the URL as a second
    header: "No URL specified"), so each example writes ``-H='X: y'``. The request each makes
    (its URL, its header, the cookie the block's awk line reads from curl's jar) is made here
    with a WebSocket client, and must stream the answer to its end."""
    lines = websocat_lines()
    assert len(lines) >= 3
    posted = prepare("finished", tmp_path, stack.base_url)
    ids = {"SID": posted["streamId"], "CID": posted["chatId"]}
    awk = "awk '$6 == \"session\" {print $7}' jar"
    block_text = (ROOT / "docs" / "api.md").read_text()
    assert f"COOKIE=$({awk})" in block_text
    cookie = subprocess.run(
        ["bash", "-c", awk], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert cookie
    # The token's user has an answer of its own (the block's curl line posts it).
    alone = tmp_path / "token"  # no cookie jar shared with the guest
    alone.mkdir()
    mine = curl(
        alone, "-H", f"Authorization: Bearer {token}", "-H", "Content-Type: application/json",
        "-d", '{"message": "Hello [demo:words=20]"}', f"{stack.base_url}/api/v1/chat",
    )  # fmt: skip
    ws_base = "ws" + stack.base_url[len("http") :]
    for where, command in lines:
        sid = mine["streamId"] if "Authorization: Bearer" in command else ids["SID"]
        env = {"COOKIE": cookie, "TOKEN": token, "SID": sid, "CID": ids["CID"]}
        words = shlex.split(command)
        headers = [w[len("-H=") :] for w in words if w.startswith("-H=")]
        assert "-H" not in words and headers, f"{where}: write -H='Name: value'"
        (url,) = [w for w in words if w.startswith("ws://")]
        url = url.replace("ws://127.0.0.1:8000", ws_base)
        for name, value in env.items():
            url = url.replace(f"${name}", value)
            headers = [h.replace(f"${name}", value) for h in headers]
        name, _, value = headers[0].partition(": ")
        with connect(url, additional_headers={name: value}, open_timeout=10) as ws:
            events: list[dict[str, Any]] = []
            while not events or events[-1]["type"] not in {"done", "cancelled", "error"}:
                events.append(json.loads(ws.recv(timeout=30)))
        assert events[-1]["type"] == "done", (where, events[-1])
