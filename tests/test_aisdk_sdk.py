"""The real AI SDK (``ai``, ``@ai-sdk/react``: exact versions in tests/aisdk/package.json)
drives relay: tests/aisdk/chat.test.mjs runs the Chat class with an unmodified
DefaultChatTransport against this stack and checks the contract's acceptance list. `make
test` installs the packages (npm ci); without them this test fails, it never skips."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import Stack
from tests.procs import ROOT

SCRIPT = ROOT / "tests" / "aisdk" / "chat.test.mjs"
NODE_MODULES = ROOT / "tests" / "aisdk" / "node_modules"


@pytest.mark.timeout(360)
def test_the_ai_sdk_chat_class_against_relay(stack: Stack) -> None:
    node = shutil.which("node")
    assert node, "Node.js (20 or later) is needed for the AI SDK test"
    assert NODE_MODULES.is_dir(), "run `npm ci --prefix tests/aisdk` (make test does)"
    result = subprocess.run(
        [node, str(SCRIPT), stack.base_url],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    output = f"{result.stdout}\n{result.stderr}"
    print(output)
    assert result.returncode == 0, output
    assert "# fail 0" in result.stdout, output  # node:test's summary: every test ran and passed
