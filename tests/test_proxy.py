"""RELAY_TRUSTED_PROXIES: behind that many reverse proxies, the web tier takes the client's
address, scheme and host from X-Forwarded-For, -Proto and -Host (Werkzeug's ProxyFix), so the
new-guest limit counts each client address and the Origin check compares with the public
host. Off (0, the default), the headers are ignored. Against real web processes."""

from __future__ import annotations

import pytest
import requests

from tests.conftest import Stack

PUBLIC = {
    "X-Forwarded-Host": "chat.example.com",
    "X-Forwarded-Proto": "https",
    "Origin": "https://chat.example.com",
}


def new_guest(base_url: str, **headers: str) -> requests.Response:
    """A post without the session cookie: a new guest user."""
    return requests.post(
        base_url + "/api/v1/chat", json={"message": "hello"}, headers=headers, timeout=15
    )


@pytest.mark.stack_env(RELAY_NEW_GUESTS_PER_MINUTE="2")
def test_trusted_proxies_give_each_client_address_its_own_guest_limit(
    isolated_stack: Stack,
) -> None:
    _web, port = isolated_stack.start_web_with(RELAY_TRUSTED_PROXIES="1")
    proxied = f"http://127.0.0.1:{port}"
    first = [new_guest(proxied, **{"X-Forwarded-For": "203.0.113.1"}) for _ in range(3)]
    assert [r.status_code for r in first] == [202, 202, 429]
    assert first[-1].json()["error"]["code"] == "rate_limited"
    assert new_guest(proxied, **{"X-Forwarded-For": "203.0.113.2"}).status_code == 202
    # Off: the header is ignored, and every guest is the proxy's address (127.0.0.1).
    direct = [
        new_guest(isolated_stack.base_url, **{"X-Forwarded-For": f"198.51.100.{i}"})
        for i in range(3)
    ]
    assert [r.status_code for r in direct] == [202, 202, 429]


def test_the_origin_check_sees_the_public_host_only_behind_trusted_proxies(
    isolated_stack: Stack,
) -> None:
    _web, port = isolated_stack.start_web_with(RELAY_TRUSTED_PROXIES="1")
    assert new_guest(f"http://127.0.0.1:{port}", **PUBLIC).status_code == 202
    refused = new_guest(isolated_stack.base_url, **PUBLIC)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden_origin"
